"""Clipping of the mean pseudo-gradient, as the DiLoCo family clips its outer gradient:
Delta_bar <- Delta_bar min(1, c / (||Delta_bar||_2 + 1e-6)), the norm over all the parameters of the step (over the
ranks' slices when the outer state is sharded, over a replica's shards with sharded replicas), before the outer
update."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..comm import Communicator
from .parts import Part


class ClipNorm(Part):
    """Delta_bar scaled to an L2 norm of at most ``max_norm`` (parameter units)."""

    def __init__(self, max_norm: float) -> None:
        if isinstance(max_norm, bool) or not isinstance(max_norm, int | float) or not max_norm > 0:
            raise ValueError(f"clip_norm must be > 0 or None (no clipping of the pseudo-gradient), got {max_norm!r}")
        if not math.isfinite(max_norm):
            raise ValueError(f"clip_norm must be finite, got {max_norm!r}")
        self.max_norm = float(max_norm)

    def clip_(self, delta: torch.Tensor, over: Sequence[Communicator] = ()) -> None:
        """In place; ``over``: the groups whose ranks hold the rest of Delta_bar (this rank's is a slice), over which
        the norm's square is summed."""
        square = delta.pow(2).sum().reshape(1)
        for comm in over:
            comm.all_reduce(square)
        delta.mul_(torch.clamp(self.max_norm / (square.sqrt() + 1e-6), max=1.0))

    def __repr__(self) -> str:
        return f"ClipNorm({self.max_norm})"
