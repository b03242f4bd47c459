"""Fragments: which parameters take their outer step when. One fragment with no delay is the whole model at the end
of every round (Algorithm 1); more, or a delay, is Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512):
``count`` = P fragments, ``delay`` = d inner steps, ``mix`` = alpha_mix.

The model's layers (each module owning a weight, with the normalizations after it, in order: :func:`layers_of`; each
parameter is a layer when SlowMo is given a list of tensors) are dealt into P fragments in a strided pattern, layer l
to fragment l mod P, so that every fragment spans the whole depth (the paper's strided fragments). Fragment p has its
own outer iterations:

    launch after inner step k when (k + 1) mod tau = p tau / P:
        start the mean of Delta_{i,p} = x_{0,p} - x^i_p               gamma_p = the base lr now
    merge after inner step k + d, the mean complete:
        x~_p = the outer update on (x_{0,p}, Delta_bar_p)
        x^i_p <- alpha_mix x~_p + (1 - alpha_mix) x^i_p   (the d local steps taken meanwhile, mixed in)
        x_{0,p} <- x~_p

so each fragment is synchronized once every tau inner steps, and a step sends at most one fragment's bytes (peak bytes
per step fall by P for fragments of equal size, as a Transformer's blocks; by |theta| / |largest fragment| in general).
Over SGP and OSGP, x^i_p is the de-biased z of push-sum: the merge sets it and the push-sum weights go on (they are
reset to 1 only when the whole model has just been set to one value on every rank: one fragment, no delay, no mix).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..comm import Communicator
from ..registry import setting
from ..shard import Shard
from .parts import Part, Parts


def layers_of(model: nn.Module) -> list[int]:
    """The layer index of each of ``model.parameters()``. A layer is a module that owns a weight (a parameter of 2
    or more dimensions: a convolution, a linear map, an embedding) together with the modules owning only vectors
    (normalizations, biases) that follow it before the next weight, so that a BatchNorm travels with its
    convolution; vectors before the first weight join the first layer."""
    layers: list[int] = []
    current = -1
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if any(p.dim() >= 2 for p in own):
            current += 1
        layers.extend([max(current, 0)] * len(own))
    return layers


@dataclass
class FragmentsConfig:
    """``slowmo.fragments``: P, d and alpha_mix."""

    count: int = setting(minimum=1)  # P: fragments, a divisor of tau
    delay: int = setting(minimum=0)  # d: inner steps a fragment's mean overlaps before its merge, < tau
    mix: float = setting(minimum=0.0)  # alpha_mix in [0, 1] (1: the outer value replaces the local one)


class Fragments(Part):
    """P fragments of strided layers, each merged d inner steps after its launch, mixed by alpha_mix."""

    def __init__(self, count: int = 1, delay: int = 0, mix: float = 1.0) -> None:
        self.count, self.delay, self.mix = count, delay, float(mix)
        self.members: list[list[int]] = []
        self.in_flight: dict[int, Flight] = {}

    @property
    def whole(self) -> bool:
        """The whole model at once, in place: Algorithm 1's outer step."""
        return self.count == 1 and self.delay == 0 and self.mix == 1.0

    def refuses(self, parts: Parts) -> str | None:
        tau = parts.tau
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1 or tau % self.count:
            return f"fragments.count must be an integer >= 1 that divides tau = {tau}, got {self.count!r}"
        if isinstance(self.delay, bool) or not isinstance(self.delay, int) or not 0 <= self.delay < tau:
            return f"fragments.delay must be an integer in [0, tau) = [0, {tau}) inner steps, got {self.delay!r}"
        if not 0 <= self.mix <= 1:
            return f"fragments.mix must be in [0, 1] (1: the outer value replaces the local one), got {self.mix!r}"
        return None

    def not_elastic(self) -> str | None:
        if not self.whole:
            return (
                "fragments (a count, a delay or a mix) would each need a vote and a quorum; phase 1 commits the "
                "whole model"
            )
        return None

    def bind(self, layers: list[int], tau: int) -> None:
        if max(layers) + 1 < self.count:
            raise ValueError(
                f"fragments.count={self.count} but the model has {max(layers) + 1} layers with parameters; use at most "
                "that many"
            )
        self.tau = tau
        self.members = [[i for i, layer in enumerate(layers) if layer % self.count == p] for p in range(self.count)]

    def due(self, step: int) -> list[int]:
        """The fragments that launch after inner step ``step``: (k + 1) mod tau = p tau / P."""
        return [p for p in range(self.count) if (step + 1) % self.tau == p * self.tau // self.count]

    def ready(self, step: int) -> list[int]:
        """The launched fragments to merge after inner step ``step`` (launched d steps before)."""
        return [p for p in sorted(self.in_flight) if self.in_flight[p].step + self.delay == step]

    def state_dict(self) -> dict[str, Any]:
        """The launched fragments, their means completed."""
        return {p: f.state_dict() for p, f in self.in_flight.items()}

    def __repr__(self) -> str:
        return f"Fragments(count={self.count}, delay={self.delay}, mix={self.mix})"


class Flight:
    """One fragment's outer step between its launch and its merge: what the mean works on and what it gives back.

    ``values``: the fragment's Delta_i packed in its members' order (:meth:`pack`), or, for the whole model in place,
    a view of the model; after the mean, Delta_bar (``averaged``: the averaged model instead)."""

    def __init__(
        self,
        fragment: int,
        step: int,
        members: list[int],
        ranges: list[tuple[int, int]],
        rows: list[int],
        gammas: list[float],
        whole: bool,
        x0: torch.Tensor,
        data: torch.Tensor,
        shard: Shard,
        comm: Communicator,
        equal: bool,
    ) -> None:
        self.fragment, self.step, self.members, self.gammas = fragment, step, members, gammas
        self.ranges = [ranges[i] for i in members]
        self.row_lengths = [rows[i] for i in members]  # each member's row (FlatParameters.rows)
        self.length = sum(b - a for a, b in self.ranges)
        self.whole, self.x0, self.data, self.shard, self.comm, self.equal = whole, x0, data, shard, comm, equal
        self.values = torch.empty(0)
        self.averaged = False
        self.work: Any = None
        self.residual: torch.Tensor | None = None

    def packed(self) -> Flight:
        """This flight's fragment as one that packs its values (:meth:`pack`) instead of working on the model."""
        twin = copy.copy(self)
        twin.whole, twin.values, twin.averaged, twin.work, twin.residual = False, torch.empty(0), False, None, None
        return twin

    def deltas(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """x_{0,p} - x^i_p, the members' ranges one after the other (into ``out``, of the fragment's length, if
        given)."""
        values = self.data.new_empty(self.length) if out is None else out
        offset = 0
        for a, b in self.ranges:
            torch.sub(self.x0[a:b], self.data[a:b], out=values[offset : offset + b - a])
            offset += b - a
        return values

    def pack(self, padded_to: int = 1) -> None:
        """``values`` = x_{0,p} - x^i_p, the members' ranges one after the other (zeros after, to a multiple of
        ``padded_to``); in the tensor ``values`` already holds where it has that size (a buffer handed over)."""
        size = -(-self.length // padded_to) * padded_to
        if self.values.numel() == size:
            self.values[self.length :].zero_()
        else:
            self.values = self.data.new_zeros(size)
        self.deltas(self.values[: self.length])

    def rows(self) -> torch.Tensor:
        """The lengths of the members' rows, one after the other in the packed order (a row-wise code's rows)."""
        return torch.cat(
            [
                torch.full(((b - a) // r,), r, dtype=torch.long, device=self.data.device)
                for (a, b), r in zip(self.ranges, self.row_lengths, strict=True)
            ]
        )

    def gather(self, flat: torch.Tensor) -> torch.Tensor:
        """The members' ranges of a flat-layout tensor, packed."""
        return torch.cat([flat[a:b] for a, b in self.ranges])

    def scatter(self, packed: torch.Tensor, flat: torch.Tensor) -> None:
        """The inverse of :meth:`gather`: ``packed`` into ``flat``'s members' ranges."""
        offset = 0
        for a, b in self.ranges:
            flat[a:b].copy_(packed[offset : offset + b - a])
            offset += b - a

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "values": self.values.clone(), "gammas": list(self.gammas)}
