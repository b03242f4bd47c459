"""Compressed pseudo-gradients (``slowmo.compression``, ``slowmo.error_feedback``): the outer step's exact average
sent in a low-precision format, as INTELLECT-1 (int8, arXiv 2412.01152) and Streaming DiLoCo (arXiv 2501.18512) do,
with error feedback (Seide et al. 2014; Karimireddy et al. 2019) as SparseLoCo and MuLoCo use it.

Each rank i compresses its pseudo-gradient plus its residual, p_i = Delta_i + e_i (Delta_i = x_{t,0} - x^i_{t,tau}),
and the mean is taken in two phases so that no low-precision sum can overflow:

1. the flat vector (padded to n L values, n ranks) is cut into n shards of L; rank i encodes every shard of p_i and
   sends shard j to rank j (one all-to-all); rank j decodes the n codes of its shard and adds them in rank order in
   the parameters' precision: mean_j = (1/n) sum_i D(Q(p_i[j]));
2. rank j encodes its shard of the mean and every rank gathers the n codes (one all-gather) and decodes them, so that
   every rank ends with the same Delta_bar = D(Q(mean)), and the same model.

Error feedback keeps what phase 1 lost on this rank: e_i <- p_i - D(Q(p_i)) (0 without it). Phase 2's rounding is
the same on every rank and is not fed back.

Codes (C = ``CHUNK`` values share one float32 scale s_c, rounding to nearest, ties to even):

    fp16, bf16   a cast of each value (no scale; fp16 saturates to +-inf past 65504)
    int8         s_c = max|p_c| / 127,  q = round(p / s_c) in [-127, 127],  D(q) = q s_c
    fp8          s_c = max|p_c| / 448,  q = e4m3(p / s_c) (float8_e4m3fn),  D(q) = q s_c
    fp4          s_c = max|p_c| / 6,    q = e2m1(p / s_c),                   D(q) = q s_c

e2m1 is the OCP Microscaling (MX v1.0) FP4 element: a sign bit and 3 bits of magnitude, 0, 0.5, 1, 1.5, 2, 3, 4 or
6 (codes 0-7, in that order); a value rounds to the nearest magnitude, a tie to the even code, and two codes share a
byte (the first in the low 4 bits; an odd length ends with a 0 nibble), as NVIDIA's ``__nv_fp4x2_e2m1`` packs them.

A shard of L values encodes to S(L) = ceil(L b) + 4 ceil(L / C) bytes (b = 2 for fp16/bf16, 1 for int8/fp8, 1/2 for
fp4, no scales for the casts), and each rank sends (n - 1) S(L) in each phase: 2 (n - 1) S(L) per outer step, against
2 (n - 1) L B for the uncompressed all-reduce of B-byte values.
"""

from __future__ import annotations

import torch

from .comm import Communicator

CODECS = ("none", "fp16", "bf16", "int8", "fp8", "fp4")
CHUNK = 256  # values per scale (int8, fp8, fp4)
_CASTS = {"fp16": torch.float16, "bf16": torch.bfloat16}
_SCALED = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0), "fp4": (torch.uint8, 6.0)}
SCALED = tuple(_SCALED)  # the codes with a scale (per 256 values, or per row)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the FP4 magnitudes of codes 0-7


class Codec:
    """Encode a 1-D float tensor into bytes and decode it back, as the table in :mod:`slowmo.compress` says."""

    def __init__(self, name: str, chunk: int = CHUNK) -> None:
        if name not in CODECS or name == "none":
            raise ValueError(f"compression must be one of {', '.join(CODECS)}, got {name!r}")
        self.name, self.chunk = name, chunk
        self.code_dtype = _CASTS[name] if name in _CASTS else _SCALED[name][0]

    def _code_bytes(self, length: int) -> int:
        if self.name == "fp4":
            return -(-length // 2)
        return length * torch.empty(0, dtype=self.code_dtype).element_size()

    def nbytes(self, length: int) -> int:
        """S(L): the bytes one shard of ``length`` values encodes to."""
        scales = 0 if self.name in _CASTS else 4 * -(-length // self.chunk)
        return self._code_bytes(length) + scales

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (1-D) as ``nbytes(len(values))`` bytes: the codes, then the float32 scales."""
        if self.name in _CASTS:
            return values.to(self.code_dtype).view(torch.uint8)
        codes, scales = self._quantize(values)
        return torch.cat([codes.view(torch.uint8), scales.view(torch.uint8)])

    def decode(self, data: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
        """The ``length`` values that ``data`` encodes, in ``dtype``."""
        codes, end = self._decoded_codes(data, length, dtype)
        if self.name in _CASTS:
            return codes
        scales = data[end:].clone().view(torch.float32).to(dtype)  # (a copy: 4-byte aligned)
        return (codes.view(-1) * scales.repeat_interleave(self.chunk)[:length]).view(-1)

    def roundtrip(self, values: torch.Tensor) -> torch.Tensor:
        """D(Q(values))."""
        return self.decode(self.encode(values), values.numel(), values.dtype)

    def _quantize(self, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, top = _SCALED[self.name]
        length = values.numel()
        padded = torch.nn.functional.pad(values, (0, -length % self.chunk)).view(-1, self.chunk)
        scales = (padded.abs().amax(dim=1) / top).to(torch.float32)  # s_c, stored as float32
        return self._codes((padded / _divisor(scales, values)[:, None]).reshape(-1)[:length]), scales

    def _decoded_codes(self, data: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        """The ``length`` codes at the start of ``data``, as values in ``dtype`` (before any scale), and where their
        bytes end."""
        end = self._code_bytes(length)
        if self.name == "fp4":
            return _e2m1_decode(data[:end], length, dtype), end
        return data[:end].view(self.code_dtype).to(dtype), end

    def _codes(self, scaled: torch.Tensor) -> torch.Tensor:
        top = _SCALED[self.name][1]
        scaled = scaled.clamp(-top, top)  # (s_c was rounded to float32)
        if self.name == "fp4":
            return _e2m1_encode(scaled)
        return (scaled.round() if self.name == "int8" else scaled).to(self.code_dtype)

    # ------------------------------------------------------------------ a scale per row
    def row_nbytes(self, rows: torch.Tensor) -> int:
        """The bytes of the values of ``rows`` (a row's length each) with a float32 scale per row."""
        return self._code_bytes(int(rows.sum())) + 4 * rows.numel()

    def encode_rows(self, values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``values`` (1-D, rows of the lengths ``rows`` one after the other) as ``row_nbytes(rows)`` bytes: the
        codes, then a float32 scale per row, s_r = max|p_r| / top."""
        top = _SCALED[self.name][1]
        index = torch.repeat_interleave(torch.arange(rows.numel(), device=values.device), rows)
        peak = values.new_zeros(rows.numel()).scatter_reduce_(0, index, values.abs(), "amax")
        scales = (peak / top).to(torch.float32)
        codes = self._codes(values / _divisor(scales, values)[index])
        return torch.cat([codes.view(torch.uint8), scales.view(torch.uint8)])

    def decode_rows(self, data: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The values that ``data`` (:meth:`encode_rows`' bytes, possibly followed by padding) encodes, in ``dtype``."""
        codes, end = self._decoded_codes(data, int(rows.sum()), dtype)
        scales = data[end : end + 4 * rows.numel()].clone().view(torch.float32).to(dtype)
        return codes * scales.repeat_interleave(rows)


def _divisor(scales: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The float32 scales in ``like``'s dtype, 1 where a scale is 0 (a chunk or row of zeros encodes as zeros)."""
    return scales.to(like.dtype).where(scales > 0, torch.ones((), dtype=like.dtype, device=like.device))


def _e2m1_encode(values: torch.Tensor) -> torch.Tensor:
    """The packed FP4 codes of ``values`` (|v| <= 6): nearest magnitude, ties to the even code, two per byte."""
    magnitude = values.abs()
    code = torch.zeros(values.shape, dtype=torch.uint8, device=values.device)
    for c in range(7):  # past the midpoint of codes c and c + 1: c + 1; on it, the even one
        midpoint = (E2M1[c] + E2M1[c + 1]) / 2
        code += magnitude >= midpoint if c % 2 else magnitude > midpoint
    code |= (values < 0).to(torch.uint8) << 3
    code = torch.nn.functional.pad(code, (0, code.numel() % 2))
    return code[0::2] | code[1::2] << 4


def _e2m1_decode(data: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    grid = torch.tensor(E2M1, dtype=dtype, device=data.device)
    signed = torch.cat([grid, -grid])  # codes 0-15
    pairs = torch.stack([signed.repeat(16), signed.repeat_interleave(16)], dim=1)  # byte b: codes b & 15, b >> 4
    return pairs[data.long()].reshape(-1)[:length]


def compressed_mean_(
    comm: Communicator, values: torch.Tensor, codec: Codec, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """In place: ``values`` (this rank's p_i, length n L) becomes D(Q(mean_i D(Q(p_i)))), the same on every rank;
    ``residual``, if given, receives p_i - D(Q(p_i)) (error feedback). Returns ``values``."""
    exchange = Exchange(comm, values, codec, residual)
    gather_mean_(comm, values, exchange.mean_shard(), codec)
    return values


class Exchange:
    """Phase 1, started: ``values`` (p_i, length n L) encoded shard by shard, shard j sent to rank j (an all-to-all in
    flight until :meth:`mean_shard`); ``residual``, if given, receives p_i - D(Q(p_i)) at once."""

    def __init__(
        self, comm: Communicator, values: torch.Tensor, codec: Codec, residual: torch.Tensor | None = None
    ) -> None:
        n = comm.world_size
        if values.numel() % n:
            raise ValueError(f"compressed_mean_: {values.numel()} values do not split into {n} shards; pad them")
        self.comm, self.n, self.length, self.codec, self.dtype = comm, n, values.numel() // n, codec, values.dtype
        size = codec.nbytes(self.length)
        shards = values.view(n, self.length)
        sent = torch.empty(n * size, dtype=torch.uint8, device=values.device)
        for j in range(n):
            sent[j * size : (j + 1) * size] = codec.encode(shards[j])
            if residual is not None:
                decoded = codec.decode(sent[j * size : (j + 1) * size], self.length, values.dtype)
                torch.sub(shards[j], decoded, out=residual.view(n, self.length)[j])
        self._sent, self._received = sent, torch.empty_like(sent)
        self._work = comm.all_to_all_async(self._received, sent)

    def heard(self) -> torch.Tensor:
        """D(Q(p_i)), shard by shard as encoded: what the mean takes of this rank's values."""
        size = self.codec.nbytes(self.length)
        return torch.cat(
            [self.codec.decode(self._sent[j * size : (j + 1) * size], self.length, self.dtype) for j in range(self.n)]
        )

    def mean_shard(self) -> torch.Tensor:
        """Wait for the all-to-all; this rank's shard of the mean: (1/n) sum_i D(Q(p_i[rank])), added in rank order."""
        self._work.wait()
        size, received = self.codec.nbytes(self.length), self._received
        mean = self.codec.decode(received[:size], self.length, self.dtype)
        for i in range(1, self.n):  # in rank order
            mean += self.codec.decode(received[i * size : (i + 1) * size], self.length, self.dtype)
        return mean.div_(self.n)


def gather_mean_(comm: Communicator, values: torch.Tensor, mean_shard: torch.Tensor, codec: Codec) -> torch.Tensor:
    """Phase 2, in place: every rank's shard of the mean, encoded, gathered and decoded into ``values`` (length n L)."""
    n, length = comm.world_size, mean_shard.numel()
    size = codec.nbytes(length)
    gathered = torch.empty(n * size, dtype=torch.uint8, device=values.device)
    comm.all_gather(gathered, codec.encode(mean_shard))
    shards = values.view(n, length)
    for j in range(n):
        shards[j] = codec.decode(gathered[j * size : (j + 1) * size], length, values.dtype)
    return values


class RowExchange:
    """The two-phase compressed mean with a scale per row (:class:`~slowmo.outer.compressed_rows.RowCompressedMean`),
    started: ``values`` (p_i: rows of the lengths ``rows``, one after the other) encoded at once, a scale per row, and
    cut into n pieces of whole rows (about length / n values each); piece j, padded to the largest piece's bytes,
    goes to rank j (one all-to-all in flight until :meth:`finish`). ``residual``, if given, receives
    p_i - D(Q(p_i)) at once. :meth:`finish` averages rank j's piece (the ranks' decoded rows added in rank order),
    encodes it with a scale per row, and all-gathers the pieces into ``values``: every row's arithmetic is the same
    whichever rank averages it, so the mean of a row does not depend on how the vector is laid out or cut (a sharded
    replica's shard holds whole rows)."""

    def __init__(
        self,
        comm: Communicator,
        values: torch.Tensor,
        rows: torch.Tensor,
        codec: Codec,
        residual: torch.Tensor | None = None,
    ) -> None:
        n, length = comm.world_size, values.numel()
        ends = torch.cumsum(rows, 0)
        targets = torch.arange(1, n, device=rows.device) * length // n  # piece j ends at the first row end >= j L/n
        cuts = [0, *torch.searchsorted(ends, targets).add_(1).clamp_(max=rows.numel()).tolist(), rows.numel()]
        self.comm, self.codec, self.values, self.dtype = comm, codec, values, values.dtype
        self.pieces = [rows[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)]  # the row lengths of piece j
        starts = [0, *torch.cumsum(torch.stack([p.sum() for p in self.pieces]), 0).tolist()]
        self.spans = list(zip(starts[:-1], starts[1:], strict=True))  # piece j's values
        self.size = max(codec.row_nbytes(p) for p in self.pieces)  # each piece's bytes, padded to this
        sent = torch.zeros(n * self.size, dtype=torch.uint8, device=values.device)
        for j, ((a, b), piece) in enumerate(zip(self.spans, self.pieces, strict=True)):
            code = codec.encode_rows(values[a:b], piece)
            sent[j * self.size : j * self.size + code.numel()] = code
            if residual is not None:
                torch.sub(values[a:b], codec.decode_rows(code, piece, self.dtype), out=residual[a:b])
        self._sent, self._received = sent, torch.empty_like(sent)
        self._work = comm.all_to_all_async(self._received, sent)

    def heard(self) -> torch.Tensor:
        """D(Q(p_i)): what the mean takes of this rank's values."""
        return torch.cat(
            [
                self.codec.decode_rows(self._sent[j * self.size : (j + 1) * self.size], piece, self.dtype)
                for j, piece in enumerate(self.pieces)
            ]
        )

    def finish(self) -> torch.Tensor:
        """Phase 2: ``values`` becomes D(Q((1/n) sum_i D(Q(p_i)))), row by row, the same on every rank; returned."""
        self._work.wait()
        n, size, rank = self.comm.world_size, self.size, self.comm.rank
        piece = self.pieces[rank]
        mean = self.codec.decode_rows(self._received[:size], piece, self.dtype)
        for i in range(1, n):  # in rank order
            mean += self.codec.decode_rows(self._received[i * size : (i + 1) * size], piece, self.dtype)
        code = self.codec.encode_rows(mean.div_(n), piece)
        mine = torch.zeros(size, dtype=torch.uint8, device=self.values.device)
        mine[: code.numel()] = code
        gathered = torch.empty(n * size, dtype=torch.uint8, device=self.values.device)
        self.comm.all_gather(gathered, mine)
        for j, ((a, b), rows) in enumerate(zip(self.spans, self.pieces, strict=True)):
            self.values[a:b] = self.codec.decode_rows(gathered[j * size : (j + 1) * size], rows, self.dtype)
        return self.values
