"""What a part of the outer step is, and the one check that the parts of a run combine.

The outer step is built from parts, each one class in its own module with its own config dataclass, registered by
name as the base algorithms are:

- the **update** (:data:`UPDATES`): x_{t+1,0} from x_{t,0} and the mean pseudo-gradient; it owns the outer state
  x_{t,0} and its own (Algorithm 1's slow momentum u, or a torch optimizer's);
- the **mean** (:data:`MEANS`): how the ranks' pseudo-gradients Delta_i = x_{t,0} - x^i_{t,tau} are averaged;
- the **fragments**: which parameters take their outer step when (one fragment, no delay: the whole model at once);
- the **clipping** of the mean pseudo-gradient (optional).

Each part declares, in :meth:`Part.refuses`, what it does not combine with and why; :meth:`Parts.check` asks every part
of a run and refuses the first such combination with that one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..registry import Registry

if TYPE_CHECKING:
    from .clip import ClipNorm
    from .fragments import Fragments

UPDATES = Registry("outer update", "slowmo.outer")
MEANS = Registry("outer mean", "slowmo.outer")


@dataclass
class Piece:
    """A run of x_{t,0} in one base param group: [start, end) in the outer state's coordinates (this rank's slice when
    the state is sharded), gamma_t (the base lr now) and gamma_{t-1} (at this run's previous outer step), and ``delta``:
    the mean pseudo-gradient on it, a view that receives x_{t+1,0}."""

    start: int
    end: int
    gamma: float
    previous: float
    delta: torch.Tensor


class Part:
    """A part of the outer step."""

    def refuses(self, parts: Parts) -> str | None:
        """Why this part does not work with the other ``parts``, in one line; None when it does."""
        return None

    def not_elastic(self) -> str | None:
        """Why this part cannot run on dist=torchft (a quorum that changes between outer steps, a vote on each),
        in one line; None when it can."""
        return None

    def not_in_shards(self) -> str | None:
        """Why this part cannot run on each rank's shard of a sharded replica (dist.replica_size > 1), in one line;
        None when it can."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], like: torch.Tensor) -> None:
        """``like``: a tensor of the parameters' dtype and device, for the tensors of ``state``."""


class Update(Part):
    """x_{t+1,0} from x_{t,0} and the mean pseudo-gradient Delta_bar, piece by piece (:class:`Piece`)."""

    x0: torch.Tensor  # x_{t,0} (this rank's slice when sharded), set by :meth:`bind`
    pseudo_gradient: str = "scaled"  # what it steps on: Delta_bar / gamma_t ("scaled", so gamma_t > 0) or Delta_bar

    def bind(self, x0: torch.Tensor) -> None:
        """Start from x_{0,0}: the outer state, in place of what a checkpoint may load later."""
        raise NotImplementedError

    def step(self, pieces: list[Piece]) -> None:
        """Each piece's ``delta`` holds Delta_bar; x_{t+1,0} goes into :attr:`x0` (the update is its one owner) and
        into ``delta``."""
        raise NotImplementedError

    def step_from_average(self, pieces: list[Piece]) -> bool:
        """Optional: the step from the averaged model x_{t,tau} = x_{t,0} - Delta_bar, which each piece's ``delta``
        holds when the exact mean averaged the whole model in place, where the update has a form that needs no
        Delta_bar (Algorithm 1's 3-pass form, bit for bit the base algorithm at beta = 0); whether it stepped. When
        it did not, the caller forms Delta_bar and calls :meth:`step`."""
        return False

    def pieces_by(self, piece: Piece) -> Any:
        """What runs of parameters may share one piece (equal values of this key, contiguous)."""
        return piece.gamma


class Mean(Part):
    """The mean over the ranks of the pseudo-gradients of one fragment (:class:`~slowmo.outer.fragments.Flight`)."""

    shards_state: bool = False  # the outer state is cut in m slices, one per rank (the mean arrives as this rank's)

    def bind(self, numel: int, like: torch.Tensor) -> None:
        """The run's size (``numel`` values of the flat parameters) and dtype/device (``like``), for any state kept."""

    def start(self, flight: Any) -> None:
        """Begin averaging the fragment's pseudo-gradients; it may complete at :meth:`finish`, steps later."""
        raise NotImplementedError

    def finish(self, flight: Any) -> None:
        """Complete the mean: ``flight.values`` then holds Delta_bar (``flight.averaged``: the averaged model, which
        only :meth:`SlowMo._merge <slowmo.outer.slowmo.SlowMo._merge>` reads before any update sees it)."""
        raise NotImplementedError

    def heard(self, flight: Any, out: torch.Tensor) -> None:
        """c_i into ``out``: what the mean takes of this rank's pseudo-gradients in ``flight`` (started, not yet
        finished), in the fragment's packed order: Delta_i itself for the exact mean, its decoded codes for a
        compressed one."""
        raise NotImplementedError

    def settle(self, world_size: int) -> None:
        """Complete what the mean keeps in flight outside the fragments' flights (the numbers are those it would
        give later): before a checkpoint, and at the end."""


@dataclass
class Parts:
    """A run's parts of the outer step, and its tau (inner steps per outer step)."""

    tau: int
    update: Update
    mean: Mean
    fragments: Fragments
    clip: ClipNorm | None = None
    elastic: str | None = None  # on dist=torchft: the preamble of its refusals (what an elastic run runs)
    sharded: str | None = None  # on sharded replicas: the preamble of their refusals

    def check(self) -> None:
        """ValueError (one line) for the first part that refuses the others, a changing quorum (an elastic run) or a
        shard of the model (sharded replicas): every rule of a combination is declared by a part
        (:meth:`Part.refuses`, :meth:`Part.not_elastic`, :meth:`Part.not_in_shards`) and checked here."""
        for part in (self.update, self.mean, self.fragments, self.clip):
            if part is None:
                continue
            reason = part.refuses(self)
            if reason:
                raise ValueError(reason)
            for preamble, why in ((self.elastic, part.not_elastic), (self.sharded, part.not_in_shards)):
                reason = why() if preamble else None
                if reason:
                    raise ValueError(f"{preamble}; {reason}")


def merge(pieces: list[Piece], key) -> list[Piece]:
    """Consecutive pieces with equal ``key(piece)`` that are contiguous in the outer state and in their ``delta``s'
    buffer, as one piece."""
    out: list[Piece] = []
    for piece in pieces:
        last = out[-1] if out else None
        if (
            last is not None
            and key(last) == key(piece)
            and last.end == piece.start
            and _follows(last.delta, piece.delta)
        ):
            base = last.delta
            last.delta = base.as_strided((base.numel() + piece.delta.numel(),), (1,), base.storage_offset())
            last.end = piece.end
        else:
            out.append(Piece(piece.start, piece.end, piece.gamma, piece.previous, piece.delta))
    return out


def _follows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the 1-D views ``a`` then ``b`` are one contiguous run of the same storage."""
    return (
        a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() + a.numel() == b.storage_offset()
    )
