"""Sharded replicas on real gloo processes: m = 2 replicas x k = 2 ranks, each replica sharding the model with FSDP2,
against the same 2 replicas unsharded (procs_per_node = 2: each rank a whole copy, the gradient averaged inside the
replica), on the same data per rank: the whole model after every run equal within 1e-6 relative; AR-SGD as HSDP
against 4-rank DDP. The reference runs are independent of the sharded path (no FSDP, no DTensor)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import slowmo
from slowmo.flat import PER_PARAMETER
from slowmo.replicas import ShardedReplicas, load_model_state_
from slowmo.train import checkpoint

WORLD, K, STEPS, TAU, BATCH = 4, 2, 100, 2, 5  # 50 outer steps
RTOL = 1e-6
STATE = "slowmo over local sgd"  # the case whose bytes and outer state are checked
OFFLOADED = "outer state in host memory"


def _model(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)  # every rank the same initial model; odd widths: FSDP pads the shards of dim 0
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3)).to(device)


def _data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(STEPS, BATCH, 6, generator=g), torch.randn(STEPS, BATCH, 3, generator=g)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)


def _adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)


LOCAL = slowmo.LocalSGD
CASES = {  # name -> (base optimizer, SlowMo's keyword arguments[, the base algorithm over the cross group])
    "slowmo over local sgd": (_sgd, {"update": lambda: slowmo.SlowMomentum(beta=0.6), "base_buffers": "reset"}),
    "diloco, adamw inside": (
        _adamw,
        {
            "update": lambda: slowmo.TorchUpdate("SGD", alpha=0.7, options={"momentum": 0.9, "nesterov": True}),
            "base_buffers": "keep",
        },
    ),
    "two fragments": (
        _sgd,
        {"update": lambda: slowmo.SlowMomentum(beta=0.5), "fragments": lambda: slowmo.Fragments(2, delay=1)},
    ),
    "clipped pseudo-gradient": (
        _sgd,
        {"update": lambda: slowmo.SlowMomentum(beta=0.6), "clip": lambda: slowmo.ClipNorm(0.01)},
    ),
    # x_{t,0}, u and the model's copy the outer step works on in host memory (prime's offload); the reference keeps
    # them with the model
    OFFLOADED: (
        _sgd,
        {"update": lambda: slowmo.SlowMomentum(beta=0.6), "base_buffers": "reset", "state_device": "cpu"},
    ),
    # a scale per row: FSDP cuts dim 0, a shard holds whole rows, so the codes are those of the whole model's rows
    "int8 mean with error feedback, a scale per row": (
        _sgd,
        {"update": lambda: slowmo.SlowMomentum(beta=0.6), "mean": lambda: slowmo.RowCompressedMean("int8", True)},
    ),
    "eager mean": (_sgd, {"update": lambda: slowmo.SlowMomentum(beta=0.5), "mean": lambda: slowmo.EagerMean()}),
    # push-sum is elementwise too: each shard gossips with its own index, every weight the same
    "slowmo over sgp": (_sgd, {"update": lambda: slowmo.SlowMomentum(beta=0.6)}, slowmo.SGP),
    "slowmo over osgp": (_sgd, {"update": lambda: slowmo.SlowMomentum(beta=0.6)}, slowmo.OSGP),
}


def _slowmo(model, comm, case: str, reference: bool = False):
    base, parts, algorithm = (*CASES[case], LOCAL)[:3]
    kwargs = {key: value() if callable(value) else value for key, value in parts.items()}
    if reference:
        kwargs.pop("state_device", None)
    built = algorithm(comm) if algorithm is LOCAL else algorithm(comm, slowmo.DirectedExponential(comm.world_size))
    return slowmo.SlowMo(model, base(model), built, tau=TAU, **kwargs)


def _train(model, opt, rank: int, forward=None, steps: int = STEPS, clip: float | None = None) -> None:
    device = next(model.parameters()).device
    x, y = (t.to(device) for t in _data(rank))
    for k in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss((forward or model)(x[k]), y[k]).backward()
        if clip is not None:  # (train.clip_grad_norm: the norm of the replica's mean gradient, the whole model's)
            opt.clip_grad_norm_(clip)
        opt.step()


def _whole(model) -> np.ndarray:
    whole = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
    return torch.cat([p.detach().reshape(-1) for p in whole]).double().cpu().numpy()


@contextlib.contextmanager
def _fsdp_bytes(group):
    """The bytes this rank sends in FSDP2's all-gathers and reduce-scatters on ``group`` (ring: (k - 1)/k of the
    gathered or scattered buffer), counted from the calls themselves."""
    sent = {"all_gather": 0, "reduce_scatter": 0}
    names = {
        "all_gather": ("all_gather_single", "all_gather_into_tensor"),
        "reduce_scatter": ("reduce_scatter_single", "reduce_scatter_tensor"),
    }
    saved = {}
    for kind, candidates in names.items():
        for name in candidates:
            original = getattr(dist, name, None)
            if original is None:
                continue
            saved[name] = original

            def counted(*args, _kind=kind, _original=original, **kwargs):
                tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
                if kwargs.get("group") is group:
                    big = max(t.numel() * t.element_size() for t in tensors)
                    n = dist.get_world_size(group)
                    sent[_kind] += (n - 1) * big // n
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
    try:
        yield sent
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)


def _all_cases(comm, device: str = "cpu") -> dict:
    out = {}
    replicas = ShardedReplicas(comm, K, device)
    for case in CASES:
        model = replicas.shard(_model(device))
        opt = _slowmo(model, replicas.cross, case)
        with _fsdp_bytes(replicas.mesh.get_group("shard")) if case == STATE else contextlib.nullcontext() as fsdp:
            _train(model, opt, comm.rank)
        sharded = _whole(model)
        if case == STATE:
            out["bytes"], out["shard"], out["fsdp"] = comm.stats(), opt.flat.numel, fsdp
            out["state"] = sum(t.numel() * t.element_size() for t in opt.update.state_dict().values())
        if case == OFFLOADED:  # the bytes of the outer state on the model's device: none where that is a GPU
            state = [*opt.update.state_dict().values(), opt.update.x0, opt.update.v]
            out["offloaded"] = {t.device.type for t in state}, sum(t.nbytes for t in state if t.is_cuda)
        model = _model(device)  # the reference: each replica a DDP of whole copies, the same algorithm, the same group
        ddp = nn.parallel.DistributedDataParallel(model, process_group=replicas.mesh.get_group("shard"))
        _train(model, _slowmo(model, replicas.cross, case, reference=True), comm.rank, ddp)
        out[case] = (sharded, _whole(model))
    model = replicas.shard(_model(device))  # the inner gradient clipped
    _train(model, _slowmo(model, replicas.cross, STATE), comm.rank, clip=0.05)
    reference = _model(device)
    ddp = nn.parallel.DistributedDataParallel(reference, process_group=replicas.mesh.get_group("shard"))
    _train(reference, _slowmo(reference, replicas.cross, STATE), comm.rank, ddp, clip=0.05)
    out["clipped gradient"] = (_whole(model), _whole(reference))
    model = replicas.shard(_model(device), replicate=True)  # AR-SGD: HSDP against DDP over the 4 ranks
    _train(model, slowmo.DistributedOptimizer(model, _sgd(model), slowmo.AllReduce(replicas.cross)), comm.rank)
    reference = _model(device)
    ddp = nn.parallel.DistributedDataParallel(reference)
    _train(reference, _sgd(reference), comm.rank, ddp)
    out["ar-sgd"] = (_whole(model), _whole(reference))
    return out


@pytest.fixture(scope="module")
def runs():
    return slowmo.comm.spawn(_all_cases, WORLD, "gloo", timeout=120)


@pytest.mark.parametrize("case", [*CASES, "clipped gradient", "ar-sgd"])
def test_sharded_replicas_equal_the_unsharded_run(runs, case):
    for rank, result in enumerate(runs):
        sharded, unsharded = result[case]
        assert np.abs(unsharded).max() > 0
        moved = np.abs(unsharded - _whole(_model())).max()
        assert moved > 1e-2, moved  # (the run trained)
        error = np.abs(sharded - unsharded).max() / np.abs(unsharded).max()
        assert error <= RTOL, (rank, error)


def test_outer_bytes_are_the_ring_formula_on_a_shard_and_the_state_is_a_shard(runs):
    """Per rank: one all-reduce of the local shard (L values, float32) across the m replicas per outer step,
    2 (m - 1) / m 4 L bytes; x_{0,0} broadcast once; inside the replica, FSDP's all-gathers and reduce-scatters,
    counted by slowmo's formula, equal to what FSDP's calls send.
    x_{t,0} and u: 2 L values, at most 2 |theta| / k + 1 MiB."""
    m, outer = WORLD // K, STEPS // TAU
    params = list(_model().parameters())
    whole = sum(p.numel() for p in params)
    padded = sum(-(-p.shape[0] // K) * (p.numel() // p.shape[0]) for p in params)  # dim 0 to a multiple of k, 1/k
    for rank, result in enumerate(runs):
        length, sent = result["shard"], result["bytes"]
        assert length == padded
        assert sent["all_reduce"] == outer * (2 * (m - 1) * 4 * length // m), (rank, sent)
        assert sent["broadcast"] == (4 * length if rank < K else 0)  # (the last of the chain sends nothing)
        # FSDP's own, inside the replica: the formula slowmo counts with, against the bytes of FSDP's calls
        assert sent["replica/all_gather"] == result["fsdp"]["all_gather"] > 0, (sent, result["fsdp"])
        assert sent["replica/reduce_scatter"] == result["fsdp"]["reduce_scatter"] > 0, (sent, result["fsdp"])
        assert {kind for kind in sent if kind.startswith("replica/")} == {
            "replica/all_gather",
            "replica/reduce_scatter",
        }
        assert result["state"] == 2 * 4 * length <= 2 * 4 * whole / K + 2**20


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU on this machine (scripts/gpu_check.sh runs these where there is one)",
)


@pytest.mark.gpu
@needs_cuda
def test_sharded_replicas_on_cuda_tensors_equal_the_unsharded_run():
    """The same 2 x 2 ranks over gloo, sharing one GPU, every tensor on it."""
    runs = slowmo.comm.spawn(_all_cases, WORLD, "gloo", args=("cuda",), timeout=300)
    for case in [*CASES, "clipped gradient", "ar-sgd"]:
        for result in runs:
            sharded, unsharded = result[case]
            assert np.abs(sharded - unsharded).max() / np.abs(unsharded).max() <= RTOL, case
    for result in runs:
        assert result["offloaded"] == ({"cpu"}, 0), result["offloaded"]  # 0 bytes of the outer state on the GPU


# ------------------------------------------------------------------------------------- resharding a checkpoint
def _save_at_k(comm, root: str) -> dict:
    """2 replicas of 2 ranks, trained, checkpointed (DCP for the sharded tensors); what each replica holds, whole."""
    replicas = ShardedReplicas(comm, K, "cpu")
    model = replicas.shard(_model())
    opt = _slowmo(model, replicas.cross, STATE)
    _train(model, opt, comm.rank, steps=STEPS - 1)  # (mid-round: the replicas differ)
    outer = opt.flat.per_parameter(opt.update.state_dict())
    whole = {key: [t.full_tensor() for t in outer[key][PER_PARAMETER]] for key in ("x0", "v")}
    momentum = [opt.base_optimizer.state[p]["momentum_buffer"].full_tensor() for p in model.parameters()]
    directory = Path(root) / "step_1"
    checkpoint.save(directory, comm, {"model": model.state_dict(), "optimizer": opt.state_dict()}, 0, "test")
    return {"model": _whole(model), **whole, "momentum": momentum}


def _load_at_k1(comm, root: str) -> dict:
    """The same 2 replicas as whole copies (k = 1): the checkpoint loaded, each rank reading its replica's."""
    model = _model()
    opt = _slowmo(model, comm, STATE)
    saved_k = 2

    directory, state, _ = checkpoint.newest(
        Path(root), comm, torch.device("cpu"), next(model.parameters()), lambda saved: comm.rank * saved_k
    )
    load_model_state_(model, state["model"])
    opt.load_state_dict(state["optimizer"])
    params = list(model.parameters())
    views = {
        key: [
            opt.update.state_dict()[key][a:b].view(p.shape) for p, (a, b) in zip(params, opt.flat.ranges, strict=True)
        ]
        for key in ("x0", "v")
    }
    momentum = [opt.base_optimizer.state[p]["momentum_buffer"] for p in params]
    return {"model": _whole(model), **views, "momentum": momentum, "directory": directory.name}


def test_a_checkpoint_of_sharded_replicas_loads_into_another_k(tmp_path):
    """k = 2 -> k = 1, the same 2 replicas: each replica's model, its base optimizer's momentum and SlowMo's x_{t,0} and
    u come back equal (DCP reshards them; each replica's under its own name, as the replicas differ)."""
    saved = slowmo.comm.spawn(_save_at_k, WORLD, "gloo", args=(str(tmp_path),), timeout=120)
    loaded = slowmo.comm.spawn(_load_at_k1, WORLD // K, "gloo", args=(str(tmp_path),), timeout=120)
    assert not np.array_equal(saved[0]["model"], saved[K]["model"])  # (the replicas differ: Local SGD mid-round)
    for replica, got in enumerate(loaded):
        want = saved[replica * K]
        assert got["directory"] == "step_1"
        assert np.array_equal(got["model"], want["model"])
        for key in ("x0", "v", "momentum"):
            assert all(torch.equal(a, b) for a, b in zip(got[key], want[key], strict=True)), key
