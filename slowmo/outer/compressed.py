"""The compressed mean of the pseudo-gradients (INTELLECT-1's int8, arXiv 2412.01152; the low-bit outer gradients of
Streaming DiLoCo, arXiv 2501.18512), with error feedback (Seide et al. 2014; Karimireddy et al. 2019) as SparseLoCo
and MuLoCo use it: each rank sends p_i = Delta_i + e_i as codes, and the mean is taken in two phases so that no
low-precision sum can overflow (:mod:`slowmo.compress`: the codes, their bytes and the two phases). Error feedback
keeps what phase 1 lost on this rank, e_i <- p_i - D(Q(p_i)), and adds it to its next pseudo-gradient.

For a fragment (streaming), its packed Delta_i (plus its part of e_i) is compressed the same way; phase 1's all-to-all
runs while the next inner steps compute, phase 2 (half the bytes) when the fragment is merged. When the base
algorithm keeps the replicas equal (AllReduce) nothing is sent: Delta_bar is this rank's own Delta.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..compress import CODECS, Codec, Exchange, gather_mean_
from .parts import MEANS, Mean


@dataclass
class CompressedMeanConfig:
    """``slowmo/mean=compressed``."""

    name: str
    codec: str  # fp16 | bf16 | int8 | fp8 | fp4 (slowmo/compress.py)
    error_feedback: bool  # add each rank's last encoding error to its next pseudo-gradient


@MEANS.register("compressed", CompressedMeanConfig, label="compressed mean")
class CompressedMean(Mean):
    """The two-phase compressed mean, in ``codec``; ``error_feedback``: e_i carried to the next outer step."""

    def __init__(self, codec: str = "int8", error_feedback: bool = False) -> None:
        if codec not in CODECS or codec == "none":
            raise ValueError(f"codec must be one of {', '.join(CODECS[1:])}, got {codec!r}")
        self.codec, self.error_feedback = Codec(codec), bool(error_feedback)
        self.residual = torch.empty(0)  # e_i, in the flat parameters' layout

    def not_elastic(self) -> str | None:
        return "the compressed mean's all-to-all and error-feedback residuals assume a fixed set of ranks"

    def bind(self, numel: int, like: torch.Tensor) -> None:
        if self.error_feedback:
            self.residual = like.new_zeros(numel)

    def start(self, flight) -> None:
        if flight.equal:  # nothing to average or send: this rank's Delta is the mean
            flight.pack()
            return
        flight.pack(padded_to=self._padding(flight))  # p_i = Delta_i (+ e_i); the padding stays 0
        residual = None
        if self.error_feedback:
            residual = torch.empty_like(flight.values)
            flight.values[: flight.length].add_(flight.gather(self.residual))
        flight.work = self._exchange(flight, residual)
        flight.residual = residual

    def finish(self, flight) -> None:
        exchange = flight.work
        if exchange is None:
            return
        flight.work = None
        self._mean(flight, exchange)
        if self.error_feedback:
            flight.scatter(flight.residual[: flight.length], self.residual)
        flight.values = flight.values[: flight.length]

    def _padding(self, flight) -> int:
        """The packed values' length is a multiple of this: n shards of equal length."""
        return flight.comm.world_size

    def _exchange(self, flight, residual: torch.Tensor | None) -> Any:
        """Phase 1, started on ``flight.values``."""
        return Exchange(flight.comm, flight.values, self.codec, residual)

    def _mean(self, flight, exchange: Any) -> None:
        """Phase 2: ``flight.values`` becomes the mean."""
        gather_mean_(flight.comm, flight.values, exchange.mean_shard(), self.codec)

    def heard(self, flight, out: torch.Tensor) -> None:
        """D(Q(p_i)), shard by shard as the exchange encoded it: p_i less what phase 1 lost."""
        sent, length = flight.values, flight.length
        if flight.work is None:  # nothing sent: this rank's Delta is the mean
            out.copy_(sent[:length])
        elif flight.residual is not None:
            torch.sub(sent[:length], flight.residual[:length], out=out)
        else:
            out.copy_(flight.work.heard()[:length])

    def state_dict(self) -> dict[str, Any]:
        return {"residual": self.residual.clone()}

    def load_state_dict(self, state: dict[str, Any], like: torch.Tensor) -> None:
        self.residual = state["residual"].to(dtype=like.dtype, device=like.device).clone()

    def __repr__(self) -> str:
        return f"CompressedMean({self.codec.name!r}, error_feedback={self.error_feedback})"
