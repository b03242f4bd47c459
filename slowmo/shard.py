"""SlowMo's outer state sharded over the ranks (fairscale's memory-efficient mode, ``slowmo/mean=sharded``).

The |theta| flat parameters are stored padded to m L values (L = ceil(|theta| / m); :class:`~slowmo.flat.
FlatParameters` with ``multiple=m``) and rank r keeps only the slice [r L, (r + 1) L) of x_{t,0} and u: 2|theta|/m
extra memory instead of 2|theta|. The exact average becomes an in-place reduce-scatter (each rank's slice of the
flat buffer receives the mean of that slice), the outer update acts on the slice, and an in-place all-gather puts
the updated slices together: the same arithmetic, element by element, as the unsharded path, and no copy of the
flat buffer.
"""

from __future__ import annotations

import torch

from .comm import Communicator


class Shard:
    """This rank's part of the flat parameters (``numel`` values, padded when ``enabled``): all of it, or its slice."""

    def __init__(self, comm: Communicator, numel: int, enabled: bool) -> None:
        self.comm, self.numel, self.enabled = comm, numel, enabled
        self.length = -(-numel // comm.world_size) if enabled else numel  # L
        self.start = comm.rank * self.length if enabled else 0

    @property
    def key(self) -> list[int] | None:
        """What a checkpoint of the slice is tied to: [rank, world size] when sharded."""
        return [self.comm.rank, self.comm.world_size] if self.enabled else None

    def mine(self, data: torch.Tensor) -> torch.Tensor:
        """This rank's slice (a view) of the flat buffer ``data``."""
        return data[self.start : self.start + self.length]

    def mean_(self, data: torch.Tensor) -> torch.Tensor:
        """In place: this rank's slice of ``data`` becomes the mean over ranks of that slice (reduce-scatter; an
        all-reduce of all of it when not sharded). Returns the slice."""
        mine = self.mine(data)
        if self.enabled:
            self.comm.reduce_scatter(mine, data).div_(self.comm.world_size)
        else:
            self.comm.all_reduce(mine, "mean")
        return mine

    def gather_(self, data: torch.Tensor) -> None:
        """In place: every rank's slice into ``data`` (all-gather; nothing to do when not sharded)."""
        if self.enabled:
            self.comm.all_gather(data, self.mine(data))

    def runs(self, runs: list[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
        """(start, end, value) ranges of the flat buffer, cut to this rank's slice, in the slice's coordinates."""
        end = self.start + self.length
        return [
            (max(a, self.start) - self.start, min(b, end) - self.start, v)
            for a, b, v in runs
            if a < end and b > self.start
        ]
