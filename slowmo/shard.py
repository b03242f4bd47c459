"""SlowMo's outer state sharded over the ranks (fairscale's memory-efficient mode, ``shard_outer_state=True``).

The |theta| flat parameters are padded to m L values (L = ceil(|theta| / m)) and rank r keeps only the slice
[r L, (r + 1) L) of x_{t,0} and u: 2|theta|/m extra memory instead of 2|theta|. The exact average becomes a
reduce-scatter (each rank receives the mean of its own slice), the outer update acts on the slice, and an
all-gather puts the updated slices together: the same arithmetic, element by element, as the unsharded path.
"""

from __future__ import annotations

import torch

from .comm import Communicator


class Shard:
    """This rank's part of a flat vector of ``numel`` values: all of it, or its slice when ``enabled``."""

    def __init__(self, comm: Communicator, numel: int, enabled: bool) -> None:
        self.comm, self.numel, self.enabled = comm, numel, enabled
        self.length = -(-numel // comm.world_size) if enabled else numel  # L

    @property
    def key(self) -> list[int] | None:
        """What a checkpoint of the slice is tied to: [rank, world size] when sharded."""
        return [self.comm.rank, self.comm.world_size] if self.enabled else None

    def _padded(self, flat: torch.Tensor, fill: float) -> torch.Tensor:
        missing = self.length * self.comm.world_size - flat.numel()
        return torch.cat([flat, flat.new_full((missing,), fill)]) if missing else flat

    def mine(self, flat: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """This rank's slice of the full ``flat`` vector (padding values: ``fill``)."""
        if not self.enabled:
            return flat
        rank = self.comm.rank
        return self._padded(flat, fill)[rank * self.length : (rank + 1) * self.length]

    def mean(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the mean over ranks of ``flat`` (reduce-scatter; all-reduce when not sharded)."""
        if not self.enabled:
            return self.comm.all_reduce(flat, "mean")
        out = flat.new_empty(self.length)
        return self.comm.reduce_scatter(out, self._padded(flat, 0.0)).div_(self.comm.world_size)

    def gather(self, mine: torch.Tensor) -> torch.Tensor:
        """The full vector from every rank's slice (all-gather; the padding is left at the end)."""
        if not self.enabled:
            return mine
        full = mine.new_empty(self.length * self.comm.world_size)
        return self.comm.all_gather(full, mine)
