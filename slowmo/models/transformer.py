"""An encoder-decoder Transformer with fairseq's shapes (``transformer_wmt_en_de`` and ``_big``), on ``torch.nn``:
a joint source/target vocabulary with all embeddings and the output projection shared, sinusoidal positions,
post-norm layers (fairseq's default), greedy decoding."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .base import MODELS, ModelConfig

# d_model, ffn, heads, layers (encoder = decoder), dropout
TRANSFORMER_SHAPES = {
    "transformer_wmt_en_de": (512, 2048, 8, 6, 0.1),
    "transformer_wmt_en_de_big": (1024, 4096, 16, 6, 0.3),
    "transformer_tiny": (64, 128, 4, 2, 0.1),
}


def sinusoids(length: int, dim: int) -> torch.Tensor:
    position = torch.arange(length).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2], table[:, 1::2] = torch.sin(position * freq), torch.cos(position * freq)
    return table


class Transformer(nn.Module):
    def __init__(self, vocab_size: int, shape: str = "transformer_wmt_en_de", pad_id: int = 0,
                 dropout: float | None = None, max_len: int = 1024) -> None:
        super().__init__()
        d_model, ffn, heads, layers, default_dropout = TRANSFORMER_SHAPES[shape]
        self.pad_id, self.d_model = pad_id, d_model
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        nn.init.normal_(self.embed.weight, 0, d_model ** -0.5)
        self.register_buffer("positions", sinusoids(max_len, d_model), persistent=False)
        self.core = nn.Transformer(d_model, heads, layers, layers, ffn,
                                   default_dropout if dropout is None else dropout, batch_first=True)

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens) * math.sqrt(self.d_model) + self.positions[: tokens.size(1)]

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        # torch's fused inference path of the encoder layers looks only at CUDA's autocast, and fails on the bf16 or
        # fp16 activations of CPU autocast: under CPU autocast, take the regular path
        fused = torch.backends.mha.get_fastpath_enabled()
        cpu_autocast = src.device.type != "cuda" and torch.is_autocast_enabled(src.device.type)
        torch.backends.mha.set_fastpath_enabled(fused and not cpu_autocast)
        try:
            return self.core.encoder(self._embed(src), src_key_padding_mask=src == self.pad_id)
        finally:
            torch.backends.mha.set_fastpath_enabled(fused)

    def decode(self, memory: torch.Tensor, src: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        causal = torch.ones(prev.size(1), prev.size(1), dtype=torch.bool, device=prev.device).triu(1)
        hidden = self.core.decoder(self._embed(prev), memory, tgt_mask=causal, tgt_is_causal=True,
                                   tgt_key_padding_mask=prev == self.pad_id, memory_key_padding_mask=src == self.pad_id)
        return hidden @ self.embed.weight.t()  # shared output projection

    def forward(self, src: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(src), src, prev)

    @torch.no_grad()
    def greedy(self, src: torch.Tensor, bos: int, eos: int, extra_len: int) -> list[list[int]]:
        memory = self.encode(src)
        out = torch.full((src.size(0), 1), bos, dtype=torch.long, device=src.device)
        done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
        for _ in range(src.size(1) + extra_len):
            nxt = self.decode(memory, src, out)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            out = torch.cat([out, nxt[:, None]], 1)
            done |= nxt == eos
            if done.all():
                break
        return [[t for t in row[1:] if t not in (eos, self.pad_id)] for row in out.tolist()]


@dataclass
class TransformerConfig(ModelConfig):
    dropout: Optional[float]  # null: the shape's own (0.1 base, 0.3 big)


def _build(cfg: TransformerConfig, vocab_size: int, pad_id: int) -> nn.Module:
    return Transformer(vocab_size, cfg.name, pad_id, cfg.dropout)


for _shape in TRANSFORMER_SHAPES:
    MODELS.register(_shape, TransformerConfig, label=_shape, takes=("tokens",))(_build)
