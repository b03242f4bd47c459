"""The exact mean of the pseudo-gradients (Algorithm 1's): an all-reduce.

For the whole model at once, it averages the parameters in place, x_{t,tau} = (1/m) sum_i x^i_{t,tau}, and hands the
update the averaged model (Delta_bar = x_{t,0} - x_{t,tau} is then one subtraction, or none: Algorithm 1's 3-pass form).
With ``shard=True`` (fairscale's memory-efficient mode, ``slowmo.shard_outer_state``) each rank keeps only its slice
of the outer state (:mod:`slowmo.shard`): the mean is a reduce-scatter into that slice, and the updated slices are
gathered back (same arithmetic, element by element; 2|theta|/m memory for x_{t,0} and u instead of 2|theta|).
For a fragment of the model (streaming), the fragment's Delta_i are packed and summed by an all-reduce that runs while
the next inner steps compute, then divided by m. When the base algorithm keeps the replicas equal (AllReduce) there is
nothing to average and nothing is sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from .parts import MEANS, Mean, Parts


@dataclass
class ExactMeanConfig:
    """``slowmo/mean=exact`` (sharded with ``slowmo.shard_outer_state=true``)."""

    name: str


@MEANS.register("exact", ExactMeanConfig, label="exact mean")
class ExactMean(Mean):
    """The mean over the ranks, exact; ``shard``: keep 1/m of the outer state per rank."""

    def __init__(self, shard: bool = False) -> None:
        self.shard = bool(shard)

    def refuses(self, parts: Parts) -> str | None:
        if self.shard and not parts.fragments.whole:
            return (
                "shard_outer_state keeps 1/m of every parameter's outer state per rank and a streaming fragment "
                "whole layers: they do not combine (set fragments to one, no delay, no mix, or shard_outer_state=false)"
            )
        return None

    def not_elastic(self) -> str | None:
        if self.shard:
            return "a sharded outer state (shard_outer_state) would have to be re-cut at every change of the quorum"
        return None

    def start(self, flight) -> None:
        if flight.whole:  # the averaged model in place (this rank's slice of it when sharded)
            equal = flight.equal
            flight.values = flight.shard.mine(flight.data) if equal else flight.shard.mean_(flight.data)
            flight.averaged = True
            return
        flight.pack()  # Delta_i of the fragment
        flight.work = None if flight.equal else flight.comm.all_reduce_async(flight.values)

    def finish(self, flight) -> None:
        if flight.work is not None:
            flight.work.wait()
            flight.work = None
            flight.values.div_(flight.comm.world_size)

    def __repr__(self) -> str:
        return f"ExactMean(shard={self.shard})"
