"""An encoder-decoder Transformer with fairseq's shapes (``transformer_wmt_en_de`` and ``_big``), on ``torch.nn``:
a joint source/target vocabulary with all embeddings and the output projection shared, sinusoidal positions,
post-norm layers (fairseq's default), greedy decoding."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    def __init__(
        self,
        vocab_size: int,
        shape: str = "transformer_wmt_en_de",
        pad_id: int = 0,
        dropout: float | None = None,
        max_len: int = 1024,
    ) -> None:
        super().__init__()
        d_model, ffn, heads, layers, default_dropout = TRANSFORMER_SHAPES[shape]
        self.pad_id, self.d_model = pad_id, d_model
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        nn.init.normal_(self.embed.weight, 0, d_model**-0.5)
        self.register_buffer("positions", sinusoids(max_len, d_model), persistent=False)
        self.core = nn.Transformer(
            d_model, heads, layers, layers, ffn, default_dropout if dropout is None else dropout, batch_first=True
        )

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
        hidden = self.core.decoder(
            self._embed(prev),
            memory,
            tgt_mask=causal,
            tgt_is_causal=True,
            tgt_key_padding_mask=prev == self.pad_id,
            memory_key_padding_mask=src == self.pad_id,
        )
        return hidden @ self.embed.weight.t()  # shared output projection

    def forward(self, src: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(src), src, prev)

    @torch.no_grad()
    def generate(
        self, src: torch.Tensor, bos: int, eos: int, extra_len: int, beam: int = 1, lenpen: float = 1.0
    ) -> list[list[int]]:
        """Batched beam search as fairseq's ``SequenceGenerator``: each step extends the ``beam`` live hypotheses
        of a sentence by every token, keeps the 2 * beam best candidates by summed log-probability, finalises the
        EOS candidates ranked among the first ``beam`` with the score sum(log p) / length ** ``lenpen`` (length
        with the EOS), and continues with the ``beam`` best others; a sentence is done once ``beam`` hypotheses are
        final, and at src_len + ``extra_len`` tokens only EOS may follow. Returns each sentence's best final
        hypothesis (without EOS). beam = 1 is greedy decoding. PAD and BOS are never generated."""
        bsz, vocab, device = src.size(0), self.embed.num_embeddings, src.device
        max_len = src.size(1) + extra_len
        memory = self.encode(src).repeat_interleave(beam, 0)
        source = src.repeat_interleave(beam, 0)
        tokens = torch.full((bsz * beam, 1), bos, dtype=torch.long, device=device)
        scores = torch.full((bsz, beam), float("-inf"), device=device)
        scores[:, 0] = 0.0  # at the first step only one hypothesis per sentence is alive
        final: list[list[tuple[float, list[int]]]] = [[] for _ in range(bsz)]
        offsets = torch.arange(bsz, device=device)[:, None] * beam
        for step in range(max_len):
            logp = torch.log_softmax(self.decode(memory, source, tokens)[:, -1].float(), -1)
            logp[:, [self.pad_id, bos]] = float("-inf")
            if step == max_len - 1:
                logp[:, torch.arange(vocab, device=device) != eos] = float("-inf")
            candidates = (scores.view(-1, 1) + logp).view(bsz, beam * vocab)
            top, index = candidates.topk(min(2 * beam, beam * vocab), dim=1)
            origin, token = index // vocab, index % vocab
            is_eos = (token == eos) & torch.isfinite(top)
            for i, j in (is_eos[:, :beam]).nonzero().tolist():
                if len(final[i]) < beam:
                    prefix = tokens[offsets[i, 0] + origin[i, j], 1:].tolist()
                    final[i].append((top[i, j].item() / (step + 1) ** lenpen, prefix))
            if all(len(hyps) >= beam for hyps in final):
                break
            rank = torch.arange(top.size(1), device=device).expand_as(top)
            keep = torch.where(is_eos, rank + top.size(1), rank).topk(beam, dim=1, largest=False).indices
            scores = top.gather(1, keep)
            scores[is_eos.gather(1, keep)] = float("-inf")  # fewer than beam non-EOS candidates: the rest are dead
            parents = (offsets + origin.gather(1, keep)).view(-1)
            tokens = torch.cat([tokens[parents], token.gather(1, keep).view(-1, 1)], 1)
        return [max(hyps, key=lambda h: h[0])[1] for hyps in final]  # max keeps the first of equal scores


@dataclass
class TransformerConfig(ModelConfig):
    dropout: float | None  # null: the shape's own (0.1 base, 0.3 big)


def _build(cfg: TransformerConfig, vocab_size: int, pad_id: int) -> nn.Module:
    return Transformer(vocab_size, cfg.name, pad_id, cfg.dropout)


for _shape in TRANSFORMER_SHAPES:
    MODELS.register(_shape, TransformerConfig, label=_shape, takes=("tokens",))(_build)
