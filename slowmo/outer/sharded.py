"""The exact mean with a sharded outer state (fairscale's memory-efficient mode): each rank keeps only its slice of
x_{t,0} and u (:mod:`slowmo.shard`), 2|theta|/m memory instead of 2|theta|. The mean is a reduce-scatter into that
slice, the update acts on the slice, and the updated slices are gathered back: the arithmetic of the exact mean,
element by element, so the run is bit-identical to ``slowmo/mean=exact``. When the base algorithm keeps the replicas
equal (AllReduce) nothing is averaged: each rank takes its slice of its own model.
"""

from __future__ import annotations

from dataclasses import dataclass

from .exact import ExactMean
from .parts import MEANS, Parts


@dataclass
class ShardedMeanConfig:
    """``slowmo/mean=sharded``."""

    name: str


@MEANS.register("sharded", ShardedMeanConfig, label="exact mean, sharded state")
class ShardedMean(ExactMean):
    """The exact mean, arriving as this rank's 1/m slice of the outer state (its whole-model path, which
    :class:`~slowmo.outer.exact.ExactMean` takes through the run's :class:`~slowmo.shard.Shard`)."""

    shards_state = True

    def refuses(self, parts: Parts) -> str | None:
        if not parts.fragments.whole:
            return (
                "a sharded outer state keeps 1/m of every parameter's outer state per rank and a streaming fragment "
                "whole layers: they do not combine (set fragments to one, no delay, no mix, or slowmo/mean=exact)"
            )
        return None

    def not_elastic(self) -> str | None:
        return "a sharded outer state (slowmo/mean=sharded) would have to be re-cut at every change of the quorum"

    def not_in_shards(self) -> str | None:
        return "each rank already keeps only its shard's outer state, 1/k of it (use slowmo/mean=exact)"

    def __repr__(self) -> str:
        return "ShardedMean()"
