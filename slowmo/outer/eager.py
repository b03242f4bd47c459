"""Eager updates (Kale, Douillard & Donchev 2025, arXiv 2502.12996): a delay of one round around another mean. The
mean of round t's pseudo-gradients is started at the outer step of round t and completes during round t + 1; the
outer step of round t uses this rank's fresh Delta_i^t in place of its share of the missing mean:

    Delta~_i^t = (Delta_i^t + sum_{j != i} c_j^{t-1}) / m  =  (Delta_i^t - c_i^{t-1}) / m + mean_j c_j^{t-1}

(c^{-1} = 0), where c_j is what the delayed mean took of rank j (:meth:`~slowmo.outer.parts.Mean.heard`): Delta_j
itself for the exact mean (an all-reduce), or its decoded codes D(Q(p_j)), p_j = Delta_j + e_j, for the compressed
mean of :mod:`slowmo.outer.compressed` (``codec``), whose exchange and error feedback run unchanged: its phase 1 during
the next round, its phase 2 at the next outer step. The ranks' x_{t+1,0} differ by their own terms and agree again on
the true means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..compress import CODECS
from .compressed import CompressedMean
from .exact import ExactMean
from .parts import MEANS, Mean, Parts


@dataclass
class EagerMeanConfig:
    """``slowmo/mean=eager``."""

    name: str
    codec: str  # none (the exact mean: an all-reduce) | fp16 | bf16 | int8 | fp8 | fp4: the compressed mean's
    error_feedback: bool  # with a codec: add each rank's last encoding error to its next pseudo-gradient


@MEANS.register("eager", EagerMeanConfig, label="eager mean")
class EagerMean(Mean):
    """The delayed mean (exact, or compressed in ``codec``) of last round, completed during this round, with this
    rank's fresh pseudo-gradient in place of its own share."""

    def __init__(self, codec: str = "none", error_feedback: bool = False) -> None:
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")
        if error_feedback and codec == "none":
            raise ValueError("error_feedback needs a codec (int8, fp8, fp4, fp16 or bf16): with none there is no error")
        self.delayed: Mean = ExactMean() if codec == "none" else CompressedMean(codec, error_feedback)
        self.own = self.last = torch.empty(0)  # c_i^{t-1}; mean_j c_j^{t-1} (once complete)
        self._pending: Any = None  # the delayed mean's flight, in flight
        self._free = self._heard = torch.empty(0)  # buffers the next round reuses (no |theta| allocated per round)

    def refuses(self, parts: Parts) -> str | None:
        if not parts.fragments.whole:
            return (
                "eager updates delay the whole mean by a round, streaming fragments each fragment's by "
                "fragments.delay steps: use one delay or the other (with eager: one fragment, no delay, no mix)"
            )
        return None

    def not_elastic(self) -> str | None:
        return "an eager mean stays in flight into the next round, past the vote and the next quorum"

    def bind(self, numel: int, like: torch.Tensor) -> None:
        self.delayed.bind(numel, like)
        self.own, self.last, self._heard = like.new_zeros(numel), like.new_zeros(numel), like.new_zeros(numel)

    def start(self, flight) -> None:
        m = flight.comm.world_size
        self._complete()  # self.last: mean_j c_j^{t-1}
        delayed = flight.packed()
        delayed.values = self._free  # (the buffer of the mean before last, if it has the size)
        self.delayed.start(delayed)  # round t's mean, completed at the next outer step
        self.delayed.heard(delayed, self._heard)  # c_i^t
        x = flight.data[: flight.length]  # the model: Delta~_i^t is written in place
        torch.sub(flight.x0, x, out=x)  # Delta_i^t
        torch.add(self.last, x.sub_(self.own), alpha=1.0 / m, out=x)  # Delta~_i^t
        self.own, self._heard = self._heard, self.own
        self._pending, self._free = delayed, self.last
        flight.values = x

    def finish(self, flight) -> None:
        """(The delayed mean of this round completes during the next one: :meth:`start` of the next outer step.)"""

    def _complete(self) -> None:
        if self._pending is None:
            return
        self.delayed.finish(self._pending)
        self.last, self._pending = self._pending.values, None

    def settle(self, world_size: int) -> None:
        self._complete()

    def state_dict(self) -> dict[str, Any]:
        return {"own": self.own.clone(), "last": self.last.clone(), "delayed": self.delayed.state_dict()}

    def load_state_dict(self, state: dict[str, Any], like: torch.Tensor) -> None:
        if "last" not in state:
            raise ValueError("the checkpoint's eager mean is of an older format; start a new run directory")
        self.own, self.last = (state[key].to(dtype=like.dtype, device=like.device).clone() for key in ("own", "last"))
        self._heard, self._free = torch.zeros_like(self.own), torch.empty(0)
        self.delayed.load_state_dict(state["delayed"], like)
        self._pending = None

    def __repr__(self) -> str:
        return f"EagerMean({self.delayed!r})"
