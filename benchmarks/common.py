"""The timed loop the benchmarks share: a few warm-up steps, then ``steps`` optimizer steps between barriers."""

from __future__ import annotations

import time

import torch


def timed_steps(comm, model: torch.nn.Module, opt, batch: int, steps: int, warmup: int) -> tuple[float, float]:
    """Train on one fixed random CIFAR-shaped batch; returns (start, end) of the ``steps`` timed steps on this
    rank's clock (the first ``warmup`` steps, which include the broadcast of rank 0's model, are not timed)."""
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    for step in range(warmup + steps):
        if step == warmup:
            comm.barrier()
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    comm.barrier()
    return start, time.perf_counter()
