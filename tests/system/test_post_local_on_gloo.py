"""Post-local SGD on real gloo processes: the engine against PyTorch's own PostLocalSGDOptimizer +
PeriodicModelAverager + DDP post_localSGD_hook when their averaging phases match, against the simulator, and for a
bit-exact resume (engine/test_post_local.py: the NumPy reference and the rest, on simulated ranks)."""

import numpy as np
import pytest
from torch import nn

import slowmo

from post_local import (
    CASES,
    SGD_M,
    N,
    Tiny,
    _base,
    _resumed,
    _run,
    _set_lr,
    _train,
    check_bytes,
    post_local_reference,
)
from problems import Setup, make_data

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


# --------------------------------------------------------------------------------------------- a second optimizer
SWITCH_AT = 6  # AllReduce for steps 0-5, then a second optimizer over the same model: LocalSGD(period=4)


def _switched(comm, s: Setup) -> dict:
    """Ours: DistributedOptimizer(AllReduce) for SWITCH_AT steps, then a second DistributedOptimizer over the same model
    and base optimizer with LocalSGD(period=H), whose averages fall after its steps H - 1, 2H - 1, ... (the global
    steps SWITCH_AT + H - 1, ...). PyTorch's: DDP with post_localSGD_hook from step SWITCH_AT and a
    PeriodicModelAverager whose first average is at that same step. Every rank's theta at the end of each."""
    data = make_data(s)
    model = Tiny(data[2])
    base = _base(model, s)
    first = slowmo.DistributedOptimizer(model, base, slowmo.AllReduce(comm))
    _train(model, first, s, data, comm.rank, 0, SWITCH_AT)
    second = slowmo.DistributedOptimizer(model, base, slowmo.LocalSGD(comm, period=s.period))
    _train(model, second, s, data, comm.rank, SWITCH_AT, s.steps)
    try:
        first.step()
        stale = None
    except RuntimeError as error:
        stale = str(error)
    ours = model.theta()
    theirs = _pytorch_post_local(comm, s, s.period, SWITCH_AT, SWITCH_AT + s.period - 1)
    return {"ours": ours, "torch": theirs, "stale": stale}


@pytest.mark.parametrize("world_size", [2, 4])
def test_a_second_optimizer_over_the_model_equals_pytorch_post_local_sgd_every_run(world_size):
    """The first optimizer's gradient hooks must not outlive it: they used to point the gradients at its own buffer and
    launch all-reduces nobody waited for, ending 4 % (2 ranks) to 17 % (4 ranks) away, differently on every run."""
    s = TORCH_SETUP.with_(period=4, world_size=world_size, steps=16)  # averages after steps 9 and 13; 14, 15 local
    runs = [slowmo.comm.spawn(_switched, world_size, "gloo", args=(s,), timeout=60) for _ in range(2)]
    for ranks in runs:
        ours, theirs = np.stack([r["ours"] for r in ranks]), np.stack([r["torch"] for r in ranks])
        assert np.allclose(ours, theirs, rtol=0, atol=1e-12), np.abs(ours - theirs).max()
        assert np.ptp(theirs, axis=0).max() > 1e-4  # the last steps are local: the ranks differ at the end
        assert all(
            r["stale"].startswith("this optimizer's parameters no longer live in its flat buffer") for r in ranks
        )
    assert all(np.array_equal(a["ours"], b["ours"]) for a, b in zip(*runs, strict=True))
