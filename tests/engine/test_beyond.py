"""Beyond Algorithm 1 (the SlowMo family since 2020): any outer optimizer, a clipped pseudo-gradient, a compressed
outer average with error feedback and the eager (overlapped) outer step, each against the plain-NumPy reference
(slowmo.reference, written from the papers' equations and slowmo.compress's format table), on 4 ranks with different
data per rank."""

import numpy as np
import pytest
import torch

import slowmo
from slowmo.compress import Codec, RowExchange, compressed_mean_
from slowmo.reference import algorithm1, beyond, codes

from problems import Setup, make_data, reference, run_engine

BIG = 1100  # |theta| = 1101 values: 4 shards of 276, two scaled chunks each (256 + 20), 3 values of padding


def thetas(s: Setup) -> np.ndarray:
    return np.stack([r["theta"] for r in slowmo.comm.spawn(run_engine, s.world_size, "simulated", args=(s,))])


PLAIN = dict(tau=4, update=dict(beta=0.5))  # Algorithm 1 (slow momentum, the exact mean) at tau = 4, beta = 0.5


def setup(algorithm: str, **outer) -> Setup:
    """The case's sections in place of those of :data:`PLAIN`; |theta| large enough for a codec's chunks."""
    d = BIG if outer.get("mean", {}).get("codec", "none") != "none" else 5
    return Setup(algorithm, outer=PLAIN | outer, momentum=0.9, decay_at=6, steps=13, d=d)


REFERENCE_CASES = [
    *[dict(mean=dict(name="compressed", codec=c)) for c in ("fp16", "bf16", "int8", "fp8", "fp4")],
    *[dict(mean=dict(name="compressed", codec=c, error_feedback=True)) for c in ("fp16", "bf16", "int8", "fp8", "fp4")],
    dict(update=dict(name="torch", optimizer="SGD", options=dict(momentum=0.6, nesterov=True))),
    dict(update=dict(name="torch", optimizer="Adam", options=dict(betas=(0.6, 0.99), eps=1e-06), alpha=0.3)),
    dict(
        update=dict(
            name="torch",
            optimizer="Adam",
            options=dict(betas=(0.9, 0.999), eps=1e-08),
            alpha=0.01,
            pseudo_gradient="raw",
        )
    ),
    dict(tau=3, clip_norm=0.05),
    dict(mean=dict(name="eager")),
    dict(
        update=dict(
            name="torch", optimizer="SGD", options=dict(momentum=0.6, nesterov=True), alpha=0.7, pseudo_gradient="raw"
        ),
        mean=dict(name="eager"),
    ),
    dict(
        clip_norm=0.1,
        update=dict(
            name="torch", optimizer="SGD", options=dict(momentum=0.6, nesterov=True), alpha=0.7, pseudo_gradient="raw"
        ),
        mean=dict(name="compressed", codec="int8", error_feedback=True),
    ),
]
LIFTED_CASES = [  # combinations the parts made possible: (algorithms, settings)
    (("localsgd", "sgp", "osgp"), dict(mean=dict(name="eager", codec="int8", error_feedback=True))),
    (
        ("localsgd", "osgp"),
        dict(
            update=dict(name="torch", optimizer="SGD", options=dict(momentum=0.6, nesterov=True), alpha=0.7),
            mean=dict(name="eager", codec="fp8"),
        ),
    ),
    (
        ("localsgd", "allreduce", "sgp"),
        dict(mean=dict(name="compressed", codec="int8", error_feedback=True), fragments=dict(count=2, delay=1)),
    ),
    (
        ("localsgd", "osgp"),
        dict(mean=dict(name="compressed", codec="fp4", error_feedback=True), fragments=dict(count=2, delay=2, mix=0.5)),
    ),
    (("sgp", "osgp"), dict(fragments=dict(count=2, delay=1))),
    (
        ("sgp", "osgp"),
        dict(
            update=dict(name="torch", optimizer="Adam", options=dict(betas=(0.9, 0.999), eps=1e-08), alpha=0.1),
            fragments=dict(count=2, delay=3, mix=0.5),
        ),
    ),
    (("sgp", "osgp"), dict(base_buffers="average", update=dict(beta=0.5, nesterov=True), fragments=dict(delay=2))),
]
STREAMING_CASES = [  # fragments: x and c (two layers), each with its own outer iterations
    dict(fragments=dict(count=2)),
    dict(fragments=dict(count=2, delay=1)),
    dict(fragments=dict(count=2, delay=3, mix=0.5)),
    dict(fragments=dict(delay=2)),  # one fragment, its all-reduce overlapped with 2 inner steps
    dict(
        update=dict(
            name="torch", optimizer="SGD", options=dict(momentum=0.6, nesterov=True), alpha=0.7, pseudo_gradient="raw"
        ),
        fragments=dict(count=2, delay=1),
    ),
    dict(
        base_buffers="reset",
        clip_norm=0.05,
        update=dict(name="torch", optimizer="Adam", options=dict(betas=(0.9, 0.999), eps=1e-08), alpha=0.1),
        fragments=dict(count=2, delay=2),
    ),
    dict(tau=6, base_buffers="average", update=dict(beta=0.5, nesterov=True), fragments=dict(count=2, delay=1)),
]


def _case_id(outer: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in outer.items())


@pytest.mark.parametrize(
    "algorithm,outer",
    [(a, o) for o in REFERENCE_CASES for a in ("localsgd", "sgp", "osgp")]
    + [(a, o) for o in STREAMING_CASES for a in ("localsgd", "allreduce")]
    + [(a, o) for algorithms, o in LIFTED_CASES for a in algorithms],
    ids=lambda v: _case_id(v) if isinstance(v, dict) else v,
)
def test_outer_step_equals_the_numpy_reference(algorithm, outer):
    s = setup(algorithm, **outer).with_(steps=15)
    expected = reference(s)
    assert np.allclose(thetas(s), expected, rtol=0, atol=1e-12)
    # the option changes the run (the reference of plain SlowMo is not also the answer)
    assert np.abs(reference(s.with_(outer=PLAIN)) - expected).max() > 1e-6


@pytest.mark.parametrize(
    "algorithm,outer",
    [
        ("localsgd", {}),
        ("sgp", dict(mean=dict(name="sharded"))),
        ("localsgd", dict(mean=dict(name="eager", codec="int8", error_feedback=True))),
        (
            "osgp",
            dict(mean=dict(name="compressed", codec="fp4", error_feedback=True), fragments=dict(count=2, delay=2)),
        ),
        ("allreduce", dict(clip_norm=0.05, fragments=dict(count=2, delay=3, mix=0.5))),
    ],
    ids=lambda v: _case_id(v) if isinstance(v, dict) else v,
)
def test_the_outer_state_in_host_memory_takes_the_same_steps(algorithm, outer):
    """``state_device="cpu"``: x_{t,0}, the parts' state and the outer step's copy of the model in buffers of their
    own (host memory, where the model is on a GPU), the model copied there and back around each fragment's mean."""
    s = setup(algorithm, **outer).with_(steps=15)
    offloaded = thetas(s.with_(outer=s.outer | {"state_device": "cpu"}))
    assert np.array_equal(offloaded, thetas(s))
    assert np.allclose(offloaded, reference(s), rtol=0, atol=1e-12)


def test_error_feedback_keeps_what_compression_lost():
    s = setup("localsgd", mean=dict(name="compressed", codec="int8"))
    exact = reference(s.with_(outer=PLAIN))
    without = np.abs(thetas(s) - exact).max()
    with_ = np.abs(thetas(setup("localsgd", mean=dict(name="compressed", codec="int8", error_feedback=True))) - exact)
    with_ = with_.max()
    assert 0 < without and 0 < with_ != without


def test_algorithm_1s_parts_named_at_their_defaults_equal_the_plain_numpy_algorithm_1():
    """Every part named, at its defaults (slow momentum, the exact mean, one fragment with no delay or mix, no
    clipping): the engine equals slowmo.reference.algorithm1's own outer step, which knows no other part, and so does
    the reference's outer step of the parts beyond it."""
    knobs = dict(alpha=0.8, beta=0.5, nesterov=True, pseudo_gradient="scaled")
    for algorithm in ("localsgd", "sgp", "osgp", "allreduce"):
        named = dict(update=dict(name="slow_momentum", **knobs), mean=dict(name="exact"), clip_norm=None)
        s = setup(algorithm, **named, fragments=dict(count=1, delay=0, mix=1.0))
        expected = algorithm1.reference(s.with_(outer=dict(tau=4, update=knobs)))
        assert np.allclose(thetas(s), expected, rtol=0, atol=1e-12)
        assert np.allclose(beyond.reference(s), expected, rtol=0, atol=1e-13)


def test_torch_nesterov_equals_the_closed_form_nesterov_and_diloco():
    nesterov = dict(momentum=0.6, nesterov=True)
    s = setup(
        "localsgd", update=dict(name="torch", optimizer="SGD", options=nesterov, alpha=0.7, pseudo_gradient="raw")
    )
    closed = s.with_(outer=dict(tau=4, update=dict(alpha=0.7, beta=0.6, nesterov=True, pseudo_gradient="raw")))
    assert np.allclose(thetas(s), thetas(closed), rtol=0, atol=1e-13)


def test_allreduce_sends_no_compressed_average_its_replicas_are_equal():
    s = setup("allreduce", mean=dict(name="compressed", codec="int8", error_feedback=True))
    assert np.allclose(thetas(s), reference(s), rtol=0, atol=1e-12)
    stats = slowmo.comm.spawn(run_engine, 4, "simulated", args=(s,))[0]["stats"]
    assert "all_to_all" not in stats and "all_gather" not in stats


def _codec_roundtrip(name, values):
    return Codec(name).roundtrip(torch.from_numpy(values)).numpy()


@pytest.mark.parametrize("name", ["int8", "fp8", "fp4"])
def test_scaled_codes_stay_within_half_a_step_of_their_chunk_scale(name):
    rng = np.random.default_rng(1)
    values = rng.normal(size=700) * np.repeat([1e-4, 1.0, 30.0], [256, 256, 188])
    error = np.abs(_codec_roundtrip(name, values) - values)
    for start in range(0, 700, 256):
        chunk, err = values[start : start + 256], error[start : start + 256]
        top = np.abs(chunk).max()
        # int8: half a step of max/127; e4m3: half a unit in the last of 3 mantissa bits (relative 2^-4), at most
        # half the subnormal spacing 2^-10 of the scale max/448 near 0
        # fp4: half the gap between neighbouring e2m1 magnitudes (0.5 below 2, 1 below 4, 2 above) of max/6
        if name == "int8":
            bound = top / 127 / 2
        elif name == "fp8":
            bound = np.maximum(np.abs(chunk) * 2.0**-4, top / 448 * 2.0**-10)
        else:
            scaled = np.abs(chunk) / (top / 6)
            bound = top / 6 * np.where(scaled < 2, 0.25, np.where(scaled < 4, 0.5, 1.0))
        assert np.all(err <= bound * (1 + 1e-6))
    assert np.all(_codec_roundtrip(name, np.zeros(10)) == 0)


def _mean_of_ones(comm, name):
    values = torch.full((8,), float(comm.rank + 1), dtype=torch.float64)
    residual = torch.empty(8, dtype=torch.float64)
    compressed_mean_(comm, values, Codec(name), residual)
    return values.numpy(), residual.numpy(), comm.stats()


ROWS = [300, 7, 7, 7, 1, 1, 1, 0, 40, 40, 40, 40, 0, 3]  # a long row, short ones, vectors' rows of one, empty rows


def _row_mean(comm, name):
    rows = torch.tensor(ROWS)
    g = torch.Generator().manual_seed(comm.rank)
    values = torch.randn(int(rows.sum()), generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, int(rows.sum()))
    values[-3:] = 0.0  # a row of zeros: scale 0
    sent, residual = values.clone(), torch.empty_like(values)
    exchange = RowExchange(comm, values, rows, Codec(name), residual)
    heard = exchange.heard()
    exchange.finish()
    pieces = [p.tolist() for p in exchange.pieces]  # the row lengths of each piece
    return sent.numpy(), values.numpy(), residual.numpy(), heard.numpy(), comm.stats(), pieces


@pytest.mark.parametrize("name", ["int8", "fp8", "fp4"])
def test_the_compressed_mean_with_a_scale_per_row_equals_the_reference_and_sends_the_formula(name):
    """4 ranks: every rank ends with the reference's mean (each row's codes, mean and re-encoding written row by row in
    NumPy, no cut into pieces), error feedback keeps p_i - D(Q(p_i)); each phase sends the largest piece's codes and
    row scales to each other rank."""
    results = slowmo.comm.spawn(_row_mean, 4, "simulated", args=(name,))
    sent = np.stack([r[0] for r in results])
    mean, decoded = codes.compressed_row_mean(sent, ROWS, name)
    assert np.abs(mean - sent.mean(axis=0)).max() > 1e-6  # (lossy: the test could tell a cast from the codes)
    ends = np.cumsum(ROWS)
    for rank, (_, values, residual, heard, stats, pieces) in enumerate(results):
        assert np.allclose(values, mean, rtol=0, atol=1e-12), rank
        assert np.allclose(heard, decoded[rank], rtol=0, atol=1e-12)
        assert np.allclose(residual, sent[rank] - decoded[rank], rtol=0, atol=1e-12)
        assert [row for piece in pieces for row in piece] == ROWS  # the pieces cut between rows, in order
        lengths = [sum(piece) for piece in pieces]
        for j, end in enumerate(np.cumsum(lengths)[:-1]):  # a cut: past the j+1-th n-th of the values, by < a row
            target = (j + 1) * ends[-1] // 4
            assert target <= end < target + max(ROWS), (j, end)
        code_bytes = {"int8": lambda n: n, "fp8": lambda n: n, "fp4": lambda n: -(-n // 2)}[name]
        largest = max(code_bytes(sum(piece)) + 4 * len(piece) for piece in pieces)
        assert stats == {"all_to_all": 3 * largest, "all_gather": 3 * largest, "total": 6 * largest}, rank


def test_fp4_rounds_ties_to_the_even_code_and_packs_two_codes_a_byte():
    # scale 1 (max 6): each midpoint between e2m1 magnitudes goes to the neighbour with the even code (0, 2, 4, 6)
    values = torch.tensor([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, 0.26, -5.1])
    expected = [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -1.0, 0.5, -6.0]
    codec = Codec("fp4")
    data = codec.encode(values)
    assert data.numel() == codec.nbytes(11) == 6 + 4  # 11 codes in 6 bytes (a 0 nibble last), one float32 scale
    assert codec.decode(data, 11, torch.float64).tolist() == expected
    # codes 7 (6.0) and 0 (0.25 -> 0), then 2 (1.0) and 2, ...: the first of each pair in the low nibble
    assert data[:2].tolist() == [0x07, 0x22] and data[5].item() == 0x0F  # -6.0: sign bit 8 + code 7, no partner
    assert data[6:].clone().view(torch.float32).item() == 1.0


@pytest.mark.parametrize("name,size", [("int8", 2 + 4), ("fp8", 2 + 4), ("fp4", 1 + 4), ("fp16", 4), ("bf16", 4)])
def test_compressed_mean_is_the_same_on_every_rank_and_sends_the_formula(name, size):
    # ranks hold 1, 2, 3, 4: exact in the casts (so is the mean 2.5); within a code step with a scale; S(L = 2) bytes
    results = slowmo.comm.spawn(_mean_of_ones, 4, "simulated", args=(name,))
    for rank, (values, residual, stats) in enumerate(results):
        assert np.array_equal(values, results[0][0])
        if name in ("fp16", "bf16"):
            assert np.all(values == 2.5) and np.all(residual == 0)
        else:
            assert np.allclose(values, 2.5, rtol=2**-4, atol=0) and np.all(np.abs(residual) <= (rank + 1) / 2**4)
        assert stats == {"all_to_all": 3 * size, "all_gather": 3 * size, "total": 6 * size}


def test_eager_ranks_differ_by_their_own_terms_and_send_plain_slowmo_bytes():
    s = setup("localsgd", mean=dict(name="eager")).with_(steps=12)  # ends on an outer step
    runs = slowmo.comm.spawn(run_engine, 4, "simulated", args=(s,))
    theta = np.stack([r["theta"] for r in runs])
    assert np.abs(theta - theta[0]).max() > 1e-6  # each rank's x_{t+1,0} has its own fresh term
    plain = slowmo.comm.spawn(run_engine, 4, "simulated", args=(s.with_(outer=PLAIN),))
    assert [r["stats"] for r in runs] == [r["stats"] for r in plain]


def _four_layers(comm, fragments):
    """A 4-layer MLP (4 x 72 values) under SlowMo, tau = 4: the bytes each inner step sends."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(4)])
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    update, fragments = slowmo.SlowMomentum(beta=0.5), slowmo.Fragments(fragments, delay=1)
    opt = slowmo.SlowMo(model, base, slowmo.LocalSGD(comm), tau=4, update=update, fragments=fragments)
    data = torch.Generator().manual_seed(comm.rank)
    sent = []
    for _ in range(12):
        before = comm.stats()["total"]
        opt.zero_grad()
        model(torch.randn(4, 8, generator=data)).pow(2).mean().backward()
        opt.step()
        sent.append(comm.stats()["total"] - before)
    return sent


def test_streaming_sends_one_fragment_at_a_time_and_the_peak_per_step_falls_by_p():
    layer = 72 * 4  # bytes of one Linear(8, 8) in fp32
    plain = slowmo.comm.spawn(_four_layers, 4, "simulated", args=(1,))[0]
    streamed = slowmo.comm.spawn(_four_layers, 4, "simulated", args=(4,))[0]
    ring = lambda nbytes: 2 * 3 * nbytes // 4  # noqa: E731
    # one fragment (a delay of 1 makes it streaming too): all 4 layers every 4th step (after step 0's broadcast)
    assert plain[1:] == [ring(4 * layer) if (k + 1) % 4 == 0 else 0 for k in range(1, 12)]
    # 4 fragments: layer p after the steps k with (k + 1) mod 4 = p, one layer per step
    assert streamed[1:] == [ring(layer)] * 11
    assert max(plain[1:]) == 4 * max(streamed[1:]) and sum(plain) == sum(streamed)  # (step 0: the broadcast and
    # fragment 1's first sync; the same bytes in all over 12 steps)


def test_a_fragment_layer_is_a_weight_with_the_normalization_after_it():
    from slowmo.outer import layers_of

    model = torch.nn.Sequential(
        torch.nn.LayerNorm(3),  # vectors before the first weight join the first layer
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )
    # parameters in order: LN (w, b), conv (w, b), BN (w, b), conv (w), BN (w, b), linear (w, b)
    assert layers_of(model) == [0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2]


def _mean_squared_errors(s: Setup) -> tuple[float, float, float]:
    """The loss over every rank's samples at the ranks' mean theta after the run, at the start, and at the optimum."""
    runs = slowmo.comm.spawn(run_engine, s.world_size, "simulated", args=(s,))
    a, y, theta0 = make_data(s)
    features = np.concatenate([a.reshape(-1, s.d), np.ones((a.size // s.d, 1))], axis=1)  # [x, c]
    loss = lambda theta: float(np.mean((features @ theta - y.reshape(-1)) ** 2))  # noqa: E731
    best = np.linalg.lstsq(features, y.reshape(-1), rcond=None)[0]
    return loss(np.mean([r["theta"] for r in runs], axis=0)), loss(theta0), loss(best)


def test_eager_without_momentum_converges_like_plain_slowmo():
    # least squares, 16 ranks with their own optima: the one-round-late mean that eager applies is stable without
    # slow momentum (the README's check of the engine behind the MNIST-1D figures)
    s = Setup("localsgd", world_size=16, steps=240, d=5)
    for outer in (dict(tau=12, update=dict(beta=0.0)), dict(tau=12, update=dict(beta=0.0), mean=dict(name="eager"))):
        final, start, best = _mean_squared_errors(s.with_(outer=outer))
        assert final - best < 0.01 * (start - best), outer


class SignSGD(torch.optim.Optimizer):
    """A user's own optimizer: x <- x - lr sign(g)."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def _one_outer_step(comm, update: dict, a: np.ndarray, y: np.ndarray, lr: float, tau: int) -> np.ndarray:
    x = torch.nn.Parameter(torch.zeros(a.shape[2], dtype=torch.float64))
    outer = slowmo.TorchUpdate(**update)  # one per rank
    opt = slowmo.SlowMo([x], torch.optim.SGD([x], lr=lr), slowmo.LocalSGD(comm), tau=tau, update=outer)
    for _ in range(tau):
        loss = 0.5 * (torch.from_numpy(a[comm.rank]) @ x - torch.from_numpy(y[comm.rank])).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x.detach().numpy().copy()


@pytest.mark.parametrize(
    "update,step",
    [
        (dict(optimizer=SignSGD, alpha=0.5), lambda g: np.sign(g)),
        (dict(optimizer=f"{__name__}.SignSGD", alpha=0.5), lambda g: np.sign(g)),  # by dotted path
        # RMSprop's own smoothing constant is also called alpha: it stays the optimizer's, the outer lr is SlowMo's
        (dict(optimizer="RMSprop", alpha=0.5, options={"alpha": 0.6}), lambda g: g / (np.sqrt(0.4 * g * g) + 1e-8)),
    ],
    ids=["own class", "own class by dotted path", "RMSprop"],
)
def test_any_optimizer_class_is_an_outer_update(update, step):
    """x_{t+1,0} = x_{t,0} - alpha gamma d(G), G = mean_i (x_{t,0} - x^i_{t,tau}) / gamma, d the optimizer's direction:
    tau plain SGD steps per rank written out in NumPy."""
    rng = np.random.default_rng(0)
    a, y, lr, tau = rng.normal(size=(4, 8, 3)), rng.normal(size=(4, 8)), 0.1, 3
    got = slowmo.comm.spawn(_one_outer_step, 4, "simulated", args=(update, a, y, lr, tau))
    local = []
    for r in range(4):
        x = np.zeros(3)
        for _ in range(tau):
            x = x - lr * a[r].T @ (a[r] @ x - y[r]) / len(y[r])
        local.append(x)
    g = np.mean([-x for x in local], axis=0) / lr
    expected = -0.5 * lr * step(g)
    for x in got:
        assert np.allclose(x, expected, rtol=0, atol=1e-12)
    assert np.abs(expected - np.mean(local, axis=0)).max() > 1e-3  # not the plain average
