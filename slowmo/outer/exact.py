"""The exact mean of the pseudo-gradients (Algorithm 1's): an all-reduce.

For the whole model at once, it averages the parameters in place, x_{t,tau} = (1/m) sum_i x^i_{t,tau}, and hands the
update the averaged model (Delta_bar = x_{t,0} - x_{t,tau} is then one subtraction, or none: Algorithm 1's 3-pass form).
Its sharded form, 1/m of the outer state per rank, is :mod:`slowmo.outer.sharded`.
For a fragment of the model (streaming), the fragment's Delta_i are packed and summed by an all-reduce that runs while
the next inner steps compute, then divided by m. When the base algorithm keeps the replicas equal (AllReduce) there is
nothing to average and nothing is sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .parts import MEANS, Mean


@dataclass
class ExactMeanConfig:
    """``slowmo/mean=exact``."""

    name: str


@MEANS.register("exact", ExactMeanConfig, label="exact mean")
class ExactMean(Mean):
    """The mean over the ranks, exact."""

    def start(self, flight) -> None:
        if flight.whole:  # the averaged model in place
            flight.values = flight.shard.mine(flight.data) if flight.equal else flight.shard.mean_(flight.data)
            flight.averaged = True
            return
        flight.pack()  # Delta_i of the fragment
        flight.work = None if flight.equal else flight.comm.all_reduce_async(flight.values)

    def finish(self, flight) -> None:
        if flight.work is not None:
            flight.work.wait()
            flight.work = None
            flight.values.div_(flight.comm.world_size)

    def heard(self, flight, out: torch.Tensor) -> None:
        flight.deltas(out)  # (the packed values are in the all-reduce)

    def __repr__(self) -> str:
        return "ExactMean()"
