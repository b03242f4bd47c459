"""The compressed formats of :mod:`slowmo.compress`, in plain NumPy, written from its table and from the formats'
definitions (fp16 and bf16 casts; int8, float8 e4m3 and FP4 e2m1 codes with a float32 scale per 256 values or per
row), and the two-phase compressed means over the ranks."""

from __future__ import annotations

import numpy as np

CHUNK = 256  # values per scale


def _round_float32(values: np.ndarray) -> np.ndarray:
    """float64 -> float32, as torch converts before any narrower float format."""
    return values.astype(np.float32).astype(np.float64)


def _bf16(values: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (8 significant bits, to nearest, ties to even) through float32's bit pattern."""
    bits = _round_float32(values).astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def _e4m3(values: np.ndarray) -> np.ndarray:
    """Round to float8 e4m3 (3 mantissa bits, exponents down to -6, subnormals spaced 2^-9; |v| <= 448 here)."""
    v = _round_float32(values)
    exponent = np.floor(np.log2(np.maximum(np.abs(v), 2.0**-6)))
    spacing = 2.0 ** (exponent - 3)
    return np.rint(v / spacing) * spacing


def _e2m1(values: np.ndarray) -> np.ndarray:
    """Round to FP4 e2m1 (|v| <= 6): the nearest of 0, 0.5, 1, 1.5, 2, 3, 4, 6 (codes 0-7), a tie to the even code."""
    grid = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    out = np.empty_like(values)
    for i, v in enumerate(values):
        distance = np.abs(grid - abs(v))
        nearest = [code for code in range(8) if distance[code] == distance.min()]
        code = nearest[0] if len(nearest) == 1 else next(c for c in nearest if c % 2 == 0)
        out[i] = -grid[code] if v < 0 else grid[code]
    return out


def _roundtrip(values: np.ndarray, compression: str, rows: list[int] | None = None) -> np.ndarray:
    """D(Q(values)) of one shard, from the definitions in slowmo.compress's docstring: a scale per 256 values, or per
    row of the lengths ``rows`` (one after the other)."""
    if compression == "fp16":
        return _round_float32(values).astype(np.float16).astype(np.float64)
    if compression == "bf16":
        return _bf16(values)
    top = {"int8": 127.0, "fp8": 448.0, "fp4": 6.0}[compression]
    rounding = {"int8": np.rint, "fp8": _e4m3, "fp4": _e2m1}[compression]
    bounds = np.cumsum([0, *rows]) if rows is not None else range(0, len(values) + CHUNK, CHUNK)
    out = np.empty_like(values)
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        chunk = values[start:end]
        if chunk.size == 0:
            continue
        scale = float(np.float32(np.abs(chunk).max() / top))
        scaled = chunk / scale if scale > 0 else chunk
        codes = np.clip(rounding(np.clip(scaled, -top, top)), -top, top)
        out[start:end] = codes * scale
    return out


def compressed_mean(sent: np.ndarray, compression: str) -> tuple[np.ndarray, np.ndarray]:
    """The two-phase compressed mean over the ranks of ``sent`` (ranks, dim): every shard of every rank's vector
    decoded and added in rank order, the mean re-encoded; returns (that mean, each rank's decoded vector)."""
    n, dim = sent.shape
    length = -(-dim // n)
    padded = np.zeros((n, n * length))
    padded[:, :dim] = sent
    decoded = np.stack(
        [
            np.concatenate([_roundtrip(row[j * length : (j + 1) * length], compression) for j in range(n)])
            for row in padded
        ]
    )
    total = decoded[0].copy()
    for row in decoded[1:]:
        total = total + row
    mean = total / n
    mean = np.concatenate([_roundtrip(mean[j * length : (j + 1) * length], compression) for j in range(n)])
    return mean[:dim], decoded[:, :dim]


def compressed_row_mean(sent: np.ndarray, rows: list[int], compression: str) -> tuple[np.ndarray, np.ndarray]:
    """The compressed mean with a scale per row (``rows``: their lengths, one after the other) over the ranks of
    ``sent`` (ranks, dim): each rank's rows decoded and added in rank order, the mean re-encoded row by row (where the
    two phases cut the vector does not enter: they cut between rows); returns (that mean, each rank's decoded
    vector)."""
    decoded = np.stack([_roundtrip(row, compression, rows) for row in sent])
    total = decoded[0].copy()
    for row in decoded[1:]:
        total = total + row
    return _roundtrip(total / len(sent), compression, rows), decoded
