"""What the benchmarks share: the optimizer, built by the training stack's own builder, the timed loop, and the GPU
benchmarks' command line."""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from slowmo.inner import DistributedOptimizer
from slowmo.train import build_optimizer, validate


def optimizer(
    comm, model: torch.nn.Module, algorithm: str, period: int | None = None, lr: float = 0.1, slowmo: dict | None = None
) -> DistributedOptimizer:
    """SGD (momentum 0.9, no Nesterov) under ``algorithm`` (allreduce | localsgd | sgp | osgp; Local SGD averages
    every ``period`` steps, never when None), wrapped in SlowMo when ``slowmo`` gives its settings (tau, beta, ...)."""
    cfg = validate(
        {
            "optimizer": {"name": "sgd", "lr": lr, "momentum": 0.9, "nesterov": False},
            "algorithm": {"name": algorithm, **({"period": period} if algorithm == "localsgd" else {})},
            "slowmo": {"enabled": slowmo is not None, **(slowmo or {})},
        }
    )
    return build_optimizer(cfg, model, comm)


def timed_steps(
    comm,
    model: torch.nn.Module,
    opt,
    batch: int,
    steps: int,
    warmup: int,
    sent: list[int] | None = None,
    sync_start: bool = True,
) -> tuple[float, float]:
    """Train on one fixed random CIFAR-shaped batch; returns (start, end) of the ``steps`` timed steps on this
    rank's clock, end when this rank's last step returns. The first ``warmup`` steps, which include the broadcast of
    rank 0's model, are not timed. ``sync_start``: the ranks pass a barrier before the timed steps; without it they
    pass one before the warm-up and each starts its clock at its own first timed step, so that communication left in
    flight by the warm-up (an eager all-reduce, overlapped gossip) is not waited for outside the window: each rank's
    window is then ``steps`` steps of the steady state. ``sent``, if given, receives the bytes this rank sent in each
    timed step."""
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    if not sync_start:
        comm.barrier()
    for step in range(warmup + steps):
        if step == warmup:
            if sync_start:
                comm.barrier()
            start = time.perf_counter()
        counted = sent is not None and step >= warmup
        before = comm.stats()["total"] if counted else 0
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if counted:
            sent.append(comm.stats()["total"] - before)
    end = time.perf_counter()
    opt.state_dict()  # completes the communication still in flight (its state is saved complete)
    comm.barrier()
    return start, end


def gpu_arguments(doc: str, out: str, small: str, argv: list[str] | None) -> tuple[argparse.Namespace, str]:
    """A GPU benchmark's command line: ``--out`` (default ``out``), ``--device cuda|cpu`` and ``--small`` (``small``
    says what: toy sizes, the smoke run the test suite makes on the CPU); cuda without a visible GPU fails in one
    line. Returns the arguments and the machine's name (the GPU's, or the CPU's)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--small", action="store_true", help=small)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible; run on a GPU machine or pass --device cpu --small for a smoke run")
    if args.device == "cpu" and not args.small:
        parser.error("the full sizes are for a GPU; on the CPU pass --small")
    machine = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    return args, machine
