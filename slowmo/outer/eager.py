"""Eager updates (Kale, Douillard & Donchev 2025, arXiv 2502.12996): the mean of round t's pseudo-gradients is
started at the outer step of round t and completes during round t + 1; the outer step of round t uses this rank's
fresh Delta_i^t in place of its share of the missing mean:

    Delta~_i^t = (Delta_i^t + sum_{j != i} c_j^{t-1}) / m        (c^{-1} = 0)

where c_j is what rank j contributed to the last mean: Delta_j itself (an all-reduce of the sum), or, with a ``codec``,
its decoded codes D(Q(p_j)), p_j = Delta_j + e_j (the two-phase compressed mean of :mod:`slowmo.compress`, whose
phase 1 runs during the next round; the sum is then m times the mean of phase 2). The ranks' x_{t+1,0} differ by
their own terms and agree again on the true means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..compress import CODECS, Codec, Exchange, gather_mean_
from .parts import MEANS, Mean, Parts


@dataclass
class EagerMeanConfig:
    """``slowmo/mean=eager``."""

    name: str
    codec: str  # none (an all-reduce) | fp16 | bf16 | int8 | fp8 | fp4: the format of the mean in flight
    error_feedback: bool  # with a codec: add each rank's last encoding error to its next pseudo-gradient


@MEANS.register("eager", EagerMeanConfig, label="eager mean")
class EagerMean(Mean):
    """Last round's mean of the others, completed during this round, with this rank's fresh pseudo-gradient."""

    def __init__(self, codec: str = "none", error_feedback: bool = False) -> None:
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")
        if error_feedback and codec == "none":
            raise ValueError("error_feedback needs a codec (int8, fp8, fp4, fp16 or bf16): with none there is no error")
        self.codec = None if codec == "none" else Codec(codec)
        self.error_feedback = bool(error_feedback)
        self.total = self.own = self.residual = torch.empty(0)  # sum_j c_j^{t-1} (once complete), c_i^{t-1}, e_i
        self._pending: Any = None  # the all-reduce of the sum, or the compressed exchange, in flight

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
        self.total, self.own = like.new_zeros(numel), like.new_zeros(numel)
        if self.error_feedback:
            self.residual = like.new_zeros(numel)

    def start(self, flight) -> None:
        m = flight.comm.world_size
        x = flight.data[: flight.length]  # the model: Delta~_i^t is written in place
        torch.sub(flight.x0, x, out=x)  # Delta_i^t
        self._complete(m)  # self.total: sum_j c_j^{t-1}
        self.total.sub_(self.own)  # the others' sum
        if self.codec is None:
            self.own.copy_(x)
            x.add_(self.total).div_(m)  # Delta~_i^t
            self.total.copy_(self.own)
            self._pending = flight.comm.all_reduce_async(self.total)
        else:
            sent = torch.zeros(-(-flight.length // m) * m, dtype=x.dtype, device=x.device)  # p_i, padded
            if self.error_feedback:
                torch.add(x, self.residual, out=sent[: flight.length])
            else:
                sent[: flight.length].copy_(x)
            lost = torch.empty_like(sent)
            self._pending = Exchange(flight.comm, sent, self.codec, lost)
            torch.sub(sent[: flight.length], lost[: flight.length], out=self.own)  # c_i = D(Q(p_i))
            if self.error_feedback:
                self.residual.copy_(lost[: flight.length])
            x.add_(self.total).div_(m)  # Delta~_i^t
            self._sent = sent
        flight.values = x

    def finish(self, flight) -> None:
        """(The mean of this round completes during the next one: :meth:`start` of the next outer step waits.)"""

    def _complete(self, m: int) -> None:
        if self._pending is None:
            return
        if self.codec is None:
            self._pending.wait()
        else:
            gather_mean_(self._pending.comm, self._sent, self._pending.mean_shard(), self.codec)
            torch.mul(self._sent[: self.total.numel()], m, out=self.total)
        self._pending = None

    def settle(self, world_size: int) -> None:
        self._complete(world_size)

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total.clone(), "own": self.own.clone(), "residual": self.residual.clone()}

    def load_state_dict(self, state: dict[str, Any], like: torch.Tensor) -> None:
        self.total, self.own, self.residual = (
            state[key].to(dtype=like.dtype, device=like.device).clone() for key in ("total", "own", "residual")
        )
        self._pending = None

    def __repr__(self) -> str:
        codec = "none" if self.codec is None else self.codec.name
        return f"EagerMean(codec={codec!r}, error_feedback={self.error_feedback})"
