"""The compressed mean with a scale per row: the two phases of :mod:`slowmo.outer.compressed` (codes of
p_i = Delta_i + e_i, the mean's own codes, error feedback e_i <- p_i - D(Q(p_i))), with one float32 scale per row of
each parameter (a slice along dim 0: s_r = max|p_r| / top) instead of one per 256 values of the flat vector, as
row-wise quantization scales an embedding's or a linear layer's rows; the vector is cut between rows for the two
phases (:class:`~slowmo.compress.RowExchange`).

What it buys: a row's codes, its mean and its error depend on that row alone, so the outer step is the same however
the model is laid out. Over sharded replicas (FSDP2 cuts each parameter along dim 0: a shard holds whole rows) it
takes the step of the unsharded run bit for bit, which a scale per 256 flat values cannot (its chunks fall on other
values in a shard). What it costs: 4 bytes per row (a vector's row is one value: its values go as codes of 1 and
scales of 4 bytes, 5 per value); each phase sends each rank's largest piece, padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compress import SCALED, RowExchange
from .compressed import CompressedMean
from .parts import MEANS


@dataclass
class RowCompressedMeanConfig:
    """``slowmo/mean=compressed_rows``."""

    name: str
    codec: str  # int8 | fp8 | fp4 (slowmo/compress.py), a float32 scale per row
    error_feedback: bool  # add each rank's last encoding error to its next pseudo-gradient


@MEANS.register("compressed_rows", RowCompressedMeanConfig, label="compressed mean, a scale per row")
class RowCompressedMean(CompressedMean):
    """The two-phase compressed mean in ``codec`` with a scale per row; ``error_feedback``: e_i carried to the next
    outer step."""

    def __init__(self, codec: str = "int8", error_feedback: bool = False) -> None:
        if codec not in SCALED:
            raise ValueError(
                f"codec must be one of {', '.join(SCALED)} (a scale per row; the fp16 and bf16 casts have no "
                f"scale, and cast alike however the model is laid out), got {codec!r}"
            )
        super().__init__(codec, error_feedback)

    def _padding(self, flight) -> int:
        return 1  # (pieces of whole rows, padded as codes)

    def _exchange(self, flight, residual: torch.Tensor | None) -> RowExchange:
        return RowExchange(flight.comm, flight.values, flight.rows(), self.codec, residual)

    def _mean(self, flight, exchange: RowExchange) -> None:
        exchange.finish()

    def __repr__(self) -> str:
        return f"RowCompressedMean({self.codec.name!r}, error_feedback={self.error_feedback})"
