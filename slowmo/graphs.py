"""Gossip topologies: who sends to whom at inner step k.

A graph over n ranks gives, for every step k, each rank's out-peers. Mixing is uniform: a rank with d
out-peers keeps 1/(d+1) of its push-sum mass (x, w) and sends 1/(d+1) to each out-peer. The mixing matrix
P(k) has P[j, i] = the share of rank i's mass that goes to rank j; it is column-stochastic (every column sums to
1), which is what makes push-sum preserve the sums of x and of w.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

from .registry import Registry

GRAPHS = Registry("gossip graph", "slowmo.graphs")


class GossipGraph(ABC):
    """A time-varying directed graph over ``world_size`` ranks."""

    def __init__(self, world_size: int) -> None:
        if world_size < 2:
            raise ValueError(f"a gossip graph needs at least 2 ranks, got world_size={world_size}")
        self.world_size = world_size

    @abstractmethod
    def out_peers(self, rank: int, step: int) -> list[int]:
        """The ranks that ``rank`` sends to at step ``step``."""

    @abstractmethod
    def in_peers(self, rank: int, step: int) -> list[int]:
        """The ranks that send to ``rank`` at step ``step`` (sorted)."""

    def peers(self, step: int) -> list[list[int]]:
        """Every rank's out-peers at step ``step``: ``peers(k)[i]`` is rank i's list."""
        return [self.out_peers(rank, step) for rank in range(self.world_size)]

    def keep_weight(self, rank: int, step: int) -> float:
        """The share of its mass a rank keeps (and sends to each out-peer): 1/(d+1)."""
        return 1.0 / (len(self.out_peers(rank, step)) + 1)

    def mixing_matrix(self, step: int) -> np.ndarray:
        """P(k), column-stochastic: x(k+1) = P(k) x(k) for push-sum mass stacked by rank."""
        n = self.world_size
        matrix = np.zeros((n, n))
        for i in range(n):
            share = self.keep_weight(i, step)
            matrix[i, i] = share
            for j in self.out_peers(i, step):
                matrix[j, i] += share
        return matrix

    def period(self) -> int:
        """Number of steps after which the sequence of graphs repeats."""
        return 1


@GRAPHS.register("directed_exponential")
class DirectedExponential(GossipGraph):
    """At step k, rank i sends to (i + 2^(k mod ceil(log2 n))) mod n: one peer per step, and every rank's mass
    reaches every other rank within ceil(log2 n) steps (SGP's default, Assran et al. 2019)."""

    def __init__(self, world_size: int) -> None:
        super().__init__(world_size)
        self._levels = max(1, math.ceil(math.log2(world_size)))

    def _offset(self, step: int) -> int:
        return 2 ** (step % self._levels)

    def out_peers(self, rank: int, step: int) -> list[int]:
        return [(rank + self._offset(step)) % self.world_size]

    def in_peers(self, rank: int, step: int) -> list[int]:
        return [(rank - self._offset(step)) % self.world_size]

    def period(self) -> int:
        return self._levels


@GRAPHS.register("ring")
class Ring(GossipGraph):
    """Rank i sends to (i + 1) mod n at every step."""

    def out_peers(self, rank: int, step: int) -> list[int]:
        return [(rank + 1) % self.world_size]

    def in_peers(self, rank: int, step: int) -> list[int]:
        return [(rank - 1) % self.world_size]


@GRAPHS.register("complete")
class Complete(GossipGraph):
    """Every rank sends to every other rank: one step of push-sum is an exact average."""

    def out_peers(self, rank: int, step: int) -> list[int]:
        return [r for r in range(self.world_size) if r != rank]

    in_peers = out_peers
