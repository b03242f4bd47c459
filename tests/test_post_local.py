"""Post-local SGD: LocalSGD(period=H, warmup_steps=K) takes the gradient mean over all ranks at inner steps k < K, then
local steps with the parameter average after steps k >= K with (k + 1) % H == 0.

Checked against a plain-NumPy reference written here from those equations (and Algorithm 1's outer step), against
PyTorch's own PostLocalSGDOptimizer + PeriodicModelAverager + DDP post_localSGD_hook on gloo, against the bytes
formula, and for bit-exact resume.
"""

import io

import numpy as np
import pytest
import torch
from torch import nn

import slowmo

from problems import Setup, lr_at, make_data

N = 4
THETA_BYTES = (5 + 1) * 8  # |theta| = 6 float64 values


def ring(nbytes: int, n: int = N) -> int:
    return 2 * (n - 1) * nbytes // n


class Tiny(nn.Module):
    """Least squares 0.5 * mean((A x + c - y)^2), x and c in two param groups; forward gives the loss (for DDP)."""

    def __init__(self, theta0: np.ndarray) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(theta0[:-1], dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor(theta0[-1], dtype=torch.float64))

    def forward(self, a: np.ndarray, y: np.ndarray) -> torch.Tensor:
        return 0.5 * (torch.from_numpy(a) @ self.x + self.c - torch.from_numpy(y)).pow(2).mean()

    def theta(self) -> np.ndarray:
        return np.concatenate([self.x.detach().numpy().copy(), [self.c.item()]])


def _base(model: Tiny, s: Setup) -> torch.optim.SGD:
    groups = [{"params": [model.x], "lr": s.lr[0]}, {"params": [model.c], "lr": s.lr[1]}]
    return torch.optim.SGD(groups, lr=s.lr[0], momentum=s.momentum, nesterov=s.nesterov)


def _build(comm, s: Setup, warmup: int | None, theta0: np.ndarray):
    """The engine; ``warmup`` None: LocalSGD built without the argument."""
    model = Tiny(theta0)
    kw = {} if warmup is None else {"warmup_steps": warmup}
    algorithm = slowmo.LocalSGD(comm, period=s.period, procs_per_node=s.procs_per_node, **kw)
    if s.slowmo is None:
        return model, slowmo.DistributedOptimizer(model, _base(model, s), algorithm)
    return model, slowmo.SlowMo(model, _base(model, s), algorithm, **s.slowmo)


def _set_lr(opt, s: Setup, k: int) -> None:
    lrs = lr_at(s, k)
    opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = float(lrs[0]), float(lrs[-1])


def _train(model, opt, s: Setup, data, rank: int, start: int, stop: int, history: list | None = None) -> None:
    a, y, _ = data
    for k in range(start, stop):
        _set_lr(opt, s, k)
        opt.zero_grad()
        model(a[rank, k], y[rank, k]).backward()
        opt.step()
        if history is not None:
            history.append(model.theta())


def _run(comm, s: Setup, warmup: int | None) -> dict:
    data = make_data(s)
    model, opt = _build(comm, s, warmup, data[2])
    history: list = []
    _train(model, opt, s, data, comm.rank, 0, s.steps, history)
    out = {"history": np.stack(history), "stats": comm.stats(), "state": opt.algorithm.state_dict()}
    comm.reset_stats()
    return out


def _resumed(comm, s: Setup, warmup: int, stop: int) -> dict:
    """Train to ``stop``, save, build fresh (another init), load, train on: the final theta and the bytes."""
    data = make_data(s)
    model, opt = _build(comm, s, warmup, data[2])
    _train(model, opt, s, data, comm.rank, 0, stop)
    blob = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, blob)
    del model, opt
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    model, opt = _build(comm, s, warmup, data[2] + 1.0)  # everything must come from the checkpoint
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    _train(model, opt, s, data, comm.rank, stop, s.steps)
    out = {"theta": model.theta(), "stats": comm.stats()}
    comm.reset_stats()
    return out


def histories(s: Setup, warmup: int | None, backend: str = "simulated") -> np.ndarray:
    """(steps, ranks, d + 1): every rank's theta after every inner step."""
    ranks = slowmo.comm.spawn(_run, s.world_size, backend, args=(s, warmup))
    return np.stack([r["history"] for r in ranks], axis=1)


# --------------------------------------------------------------------------------------------- the reference
def post_local_reference(s: Setup, warmup: int) -> np.ndarray:
    """Plain NumPy, from the equations: (steps, ranks, d + 1).

    k < K: g^i <- (1/n) sum_j g^j (all ranks); k >= K: g^i local (mean over the node's ranks with procs_per_node p).
    torch.optim.SGD: b <- g (first step) or mu b + g; d = g + mu b (Nesterov) or b; theta <- theta - lr d.
    Average after step k when k >= K, (k + 1) % H == 0 and no outer step follows. SlowMo (Algorithm 1, scaled
    pseudo-gradient) after step k when (k + 1) % tau == 0: u <- beta u + (x0 - mean theta) / lr; x0 <- x0 - alpha lr u;
    every rank restarts from x0.
    """
    a, y, theta0 = make_data(s)
    n, p, dim = s.world_size, s.procs_per_node, s.d + 1
    theta = np.tile(theta0, (n, 1))
    buf = np.zeros((n, dim))
    x0, u = theta0.copy(), np.zeros(dim)
    out = []
    for k in range(s.steps):
        lr = lr_at(s, k)
        resid = np.einsum("rbd,rd->rb", a[:, k], theta[:, :-1]) + theta[:, -1:] - y[:, k]
        g = np.concatenate([np.einsum("rbd,rb->rd", a[:, k], resid), resid.sum(1, keepdims=True)], axis=1) / s.batch
        if k < warmup:
            g = np.tile(g.mean(axis=0), (n, 1))
        elif p > 1:
            g = np.repeat(g.reshape(n // p, p, dim).mean(axis=1), p, axis=0)
        if s.momentum:
            buf = g.copy() if k == 0 else s.momentum * buf + g
            g = g + s.momentum * buf if s.nesterov else buf
        theta = theta - lr * g
        outer = s.slowmo is not None and (k + 1) % s.slowmo["tau"] == 0
        if s.period is not None and k >= warmup and (k + 1) % s.period == 0 and not outer:
            theta = np.tile(theta.mean(axis=0), (n, 1))
        if outer:
            u = s.slowmo.get("beta", 0.0) * u + (x0 - theta.mean(axis=0)) / lr
            x0 = x0 - s.slowmo.get("alpha", 1.0) * lr * u
            theta = np.tile(x0, (n, 1))
        out.append(theta.copy())
    return np.stack(out)


SGD_M = dict(momentum=0.9, nesterov=True, decay_at=7, steps=14)
CASES = {  # id: (setup, K)
    "H3 K5": (Setup("localsgd", period=3, **SGD_M), 5),
    "H4 K6": (Setup("localsgd", period=4, momentum=0.9, steps=14), 6),
    "H2 K3 slowmo tau4": (Setup("localsgd", period=2, slowmo=dict(tau=4, beta=0.6), **SGD_M), 3),
    "Hnone K6 slowmo tau4 alpha0.7": (
        Setup("localsgd", slowmo=dict(tau=4, alpha=0.7, beta=0.5), momentum=0.9, steps=14),
        6,
    ),
    "H3 K4 nodes": (Setup("localsgd", period=3, procs_per_node=2, **SGD_M), 4),
    "H2 K5 nodes slowmo tau4": (
        Setup("localsgd", period=2, procs_per_node=2, slowmo=dict(tau=4, beta=0.6), **SGD_M),
        5,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_engine_equals_the_numpy_reference(name):
    s, warmup = CASES[name]
    got, want = histories(s, warmup), post_local_reference(s, warmup)
    assert np.allclose(got, want, rtol=0, atol=1e-12), np.abs(got - want).max()
    assert np.ptp(got[warmup - 1], axis=0).max() == 0  # the replicas are the same bits after the warm-up ...
    assert np.ptp(want[warmup:], axis=1).max() > 1e-4  # ... and apart after some later local step
    plain = post_local_reference(s, 0)  # the warm-up changes the run
    assert np.abs(got[-1] - plain[-1]).max() > 1e-4


@pytest.mark.parametrize(
    "s",
    [Setup("localsgd", period=3, momentum=0.9), Setup("localsgd", period=2, slowmo=dict(tau=4, beta=0.6))],
    ids=["H3", "H2 slowmo"],
)
def test_warmup_zero_is_bit_identical_to_local_sgd_without_it(s):
    without = slowmo.comm.spawn(_run, N, "simulated", args=(s, None))
    zero = slowmo.comm.spawn(_run, N, "simulated", args=(s, 0))
    for a, b in zip(without, zero, strict=True):
        assert np.array_equal(a["history"], b["history"])
        assert a["stats"] == b["stats"]
        assert a["state"] == b["state"] == {}


# --------------------------------------------------------------------------------------------- bytes
def expected_bytes(s: Setup, warmup: int) -> dict[str, int]:
    """K gradient all-reduces of |theta| over all ranks, one per parameter average (Local SGD's, or SlowMo's exact
    one after the warm-up), the node's gradient mean at every later step; plus the start-up broadcast."""
    tau = s.slowmo["tau"] if s.slowmo else None
    averages = 0
    for k in range(s.steps):
        outer = tau is not None and (k + 1) % tau == 0
        local_average = s.period is not None and k >= warmup and (k + 1) % s.period == 0 and not outer
        averages += local_average or (outer and k >= warmup)  # no exact average while the replicas are equal
    out = {"all_reduce": (warmup + averages) * ring(THETA_BYTES)}
    if s.procs_per_node > 1:
        out["node/all_reduce"] = (s.steps - warmup) * ring(THETA_BYTES, s.procs_per_node)
    return out


def check_bytes(stats: list[dict], s: Setup, warmup: int) -> None:
    expected = expected_bytes(s, warmup)
    for rank, st in enumerate(stats):
        st = dict(st)
        assert st.pop("broadcast") == (0 if rank == N - 1 else THETA_BYTES)
        total = st.pop("total")
        assert {k: v for k, v in st.items() if v} == expected
        assert total == sum(expected.values()) + (0 if rank == N - 1 else THETA_BYTES)


@pytest.mark.parametrize("name", ["H3 K5", "H2 K3 slowmo tau4", "Hnone K6 slowmo tau4 alpha0.7", "H3 K4 nodes"])
def test_bytes_equal_the_formula(name):
    s, warmup = CASES[name]
    ranks = slowmo.comm.spawn(_run, N, "simulated", args=(s, warmup))
    check_bytes([r["stats"] for r in ranks], s, warmup)


def test_bytes_formula_by_hand():
    # H3 K5, 14 steps: 5 gradient all-reduces, averages after k = 5, 8, 11: 8 all-reduces of 48 bytes (72 each).
    assert expected_bytes(*CASES["H3 K5"]) == {"all_reduce": 8 * 72}
    # H2 K3 tau4: Local SGD's averages after k = 5, 9, 13; SlowMo's after k = 3 (the first local step), 7, 11.
    assert expected_bytes(*CASES["H2 K3 slowmo tau4"]) == {"all_reduce": (3 + 3 + 3) * 72}
    # no H, K6 tau4: SlowMo's after k = 7, 11; none after k = 3, a warm-up step (the replicas are equal).
    assert expected_bytes(*CASES["Hnone K6 slowmo tau4 alpha0.7"]) == {"all_reduce": (6 + 2) * 72}
    # H3 K4, nodes of 2: 4 all-reduces over all ranks, averages after k = 5, 8, 11; 10 node means (48 bytes each).
    assert expected_bytes(*CASES["H3 K4 nodes"]) == {"all_reduce": (4 + 3) * 72, "node/all_reduce": 10 * 48}


# --------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("stop", [3, 7], ids=["mid warm-up", "after it"])
@pytest.mark.parametrize("name", ["H3 K5", "H2 K5 nodes slowmo tau4"])
def test_resume_is_bit_exact(name, stop):
    s, warmup = CASES[name]
    straight = slowmo.comm.spawn(_run, N, "simulated", args=(s, warmup))
    resumed = slowmo.comm.spawn(_resumed, N, "simulated", args=(s, warmup, stop))
    for a, b in zip(straight, resumed, strict=True):
        assert np.array_equal(a["history"][-1], b["theta"])
        assert a["stats"] == b["stats"]


def _load_into_warmup(comm):
    s = Setup("localsgd", period=2, steps=3)
    data = make_data(s)
    _, opt = _build(comm, s, 0, data[2])
    state = opt.state_dict()
    _, other = _build(comm, s, 2, data[2])
    other.load_state_dict(state)


def test_a_checkpoint_without_the_step_counter_is_refused():
    with pytest.raises(ValueError, match=r"no step counter \(saved with warmup_steps=0\); resume with warmup_steps=0"):
        slowmo.comm.spawn(_load_into_warmup, 2, "simulated")


# --------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_bad_warmup_steps_is_one_value_error(value):
    with pytest.raises(ValueError, match="LocalSGD warmup_steps must be an integer >= 0") as info:
        slowmo.LocalSGD(slowmo.comm.Single(), period=2, warmup_steps=value)
    assert "\n" not in str(info.value)


def test_bad_warmup_steps_in_the_config_is_one_line():
    from slowmo.train import ConfigError, compose, validate

    with pytest.raises(ConfigError) as info:
        validate(compose(["algorithm=localsgd", "algorithm.warmup_steps=-1", "run_dir=x"]))
    assert str(info.value) == "algorithm.warmup_steps must be an integer >= 0 (0: no warm-up), got -1"
    assert validate(compose(["algorithm=localsgd", "run_dir=x"])).algorithm.warmup_steps == 0
    assert (
        validate(compose(["algorithm=localsgd", "algorithm.warmup_steps=7", "run_dir=x"])).algorithm.warmup_steps == 7
    )


# --------------------------------------------------------------------------------------------- gloo, PyTorch
# (H, K, K' = the PeriodicModelAverager's warmup_steps, procs_per_node): ours averages after k >= K with
# (k + 1) % H == 0, PyTorch's after k >= K' with (k - K') % H == 0: K' = K when (K + 1) % H == 0, else the first
# k >= K with (k + 1) % H == 0. With nodes, PyTorch's hook averages the gradient over the node's subgroup after K.
TORCH_PHASES = [(3, 5, 5, 1), (4, 3, 3, 1), (3, 4, 5, 1), (3, 5, 5, 2)]
TORCH_SETUP = Setup("localsgd", **SGD_M)
GLOO = {  # the engine on gloo (its hooks launch during backward there) against the simulator
    "H3 K5": CASES["H3 K5"],
    "H2 K5 nodes slowmo tau4": CASES["H2 K5 nodes slowmo tau4"],
}
GLOO_RESUME = ("H2 K5 nodes slowmo tau4", 7)


def _pytorch_post_local(comm, s: Setup, period: int, start: int, averager_warmup: int) -> np.ndarray:
    """PyTorch's post-local SGD: DDP with post_localSGD_hook (global gradient all-reduce for k < start; after it,
    nothing, or the mean over the node's subgroup of procs_per_node consecutive ranks) and
    PostLocalSGDOptimizer(SGD, PeriodicModelAverager); every rank's theta after the last step."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.post_localSGD_hook import PostLocalSGDState, post_localSGD_hook
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    a, y, theta0 = make_data(s)
    model = Tiny(theta0)
    ddp = nn.parallel.DistributedDataParallel(model)
    nodes = s.procs_per_node > 1
    subgroup = dist.new_subgroups(group_size=s.procs_per_node)[0] if nodes else None
    state = PostLocalSGDState(
        process_group=None, subgroup=subgroup, start_localSGD_iter=start, post_local_gradient_allreduce=nodes
    )
    ddp.register_comm_hook(state, post_localSGD_hook)
    opt = PostLocalSGDOptimizer(_base(model, s), PeriodicModelAverager(period=period, warmup_steps=averager_warmup))
    for k in range(s.steps):
        _set_lr(opt, s, k)
        opt.zero_grad()
        ddp(a[comm.rank, k], y[comm.rank, k]).backward()
        opt.step()
    return model.theta()


def _gloo_all(comm) -> dict:
    out = {"torch": [], "ours": []}
    for period, start, averager_warmup, procs_per_node in TORCH_PHASES:
        s = TORCH_SETUP.with_(period=period, procs_per_node=procs_per_node)
        out["ours"].append(_run(comm, s, start)["history"][-1])
        out["torch"].append(_pytorch_post_local(comm, s, period, start, averager_warmup))
    out["gloo"] = {name: _run(comm, s, warmup) for name, (s, warmup) in GLOO.items()}
    name, stop = GLOO_RESUME
    out["resumed"] = _resumed(comm, *CASES[name], stop)
    return out


@pytest.fixture(scope="module")
def gloo():
    return slowmo.comm.spawn(_gloo_all, N, "gloo", timeout=60)


@pytest.mark.parametrize(
    "index", range(len(TORCH_PHASES)), ids=[f"H{h} K{k} K'{w} nodes of {p}" for h, k, w, p in TORCH_PHASES]
)
def test_equals_pytorch_post_local_sgd_when_the_phase_matches(gloo, index):
    ours = np.stack([r["ours"][index] for r in gloo])
    theirs = np.stack([r["torch"][index] for r in gloo])
    assert np.allclose(ours, theirs, rtol=0, atol=1e-12), np.abs(ours - theirs).max()
    assert np.ptp(theirs, axis=0).max() > 1e-4  # steps 12 and 13 are local: the ranks differ at the end
    period, start, _, procs_per_node = TORCH_PHASES[index]
    reference = post_local_reference(TORCH_SETUP.with_(period=period, procs_per_node=procs_per_node), start)[-1]
    assert np.allclose(ours, reference, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", list(GLOO))
def test_gloo_equals_simulated(gloo, name):
    s, warmup = GLOO[name]
    simulated = slowmo.comm.spawn(_run, N, "simulated", args=(s, warmup))
    for sim, real in zip(simulated, gloo, strict=True):
        assert np.allclose(real["gloo"][name]["history"], sim["history"], rtol=0, atol=1e-12)
        assert real["gloo"][name]["stats"] == sim["stats"]
    check_bytes([r["gloo"][name]["stats"] for r in gloo], s, warmup)  # no gradient all-reduce after the warm-up


def test_gloo_resume_is_bit_exact(gloo):
    name, _ = GLOO_RESUME
    for r in gloo:
        assert np.array_equal(r["resumed"]["theta"], r["gloo"][name]["history"][-1])
        assert r["resumed"]["stats"] == r["gloo"][name]["stats"]
