"""Sharded replicas against replicated ones: inner steps/s, memory per rank and bytes per step, side by side.

4 gloo processes on this machine, one thread each; a small Transformer encoder (4 layers, d = 256, 4 heads, feed-forward
1024, vocabulary 2000: 3.7 M parameters) trained as a language model on fixed random tokens, batch 8 x 64 per rank,
Adam inside. The configurations (``configs/benchmark/sharded_replicas.yaml``): SlowMo over Local SGD (tau = 12) with 2
replicas of 2 ranks sharding the model with FSDP2, the same with each rank a whole copy (the gradient averaged inside
the replica), and AR-SGD over the 4 ranks with whole copies and as HSDP. All live in the same 4 processes and are
timed in interleaved rounds of 24 steps (2 outer iterations), so that drifts of the machine hit all alike; a ratio is
the median over rounds of the ratio within a round against the replicated SlowMo.

Memory per rank is measured on the tensors themselves after the last round: the parameters this rank holds, their
gradients, the base optimizer's state and the outer state (x_{t,0} and u), bytes (the gathered parameters FSDP frees
after each block are not held: on a GPU they bound the peak by one block's worth, not counted here). Bytes per inner
step by kind are the ranks' counters (FSDP's own collectives by slowmo's formula, tested against FSDP's calls).

Writes ``results/sharded/``: ``sharded.csv`` and its ``README.md``.
Run: ``python benchmarks/sharded.py`` (about 4 minutes on 2 cores; pause other work: it times).
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from slowmo.comm import spawn
from slowmo.train import place_model

from common import config, interleaved, optimizer, suite
from readme import record

SUITE = suite("sharded_replicas")  # configs/benchmark/sharded_replicas.yaml
CELLS = {name: config(SUITE["base"].split(), cell) for name, cell in SUITE["cells"].items()}
REFERENCE = next(name for name, cfg in CELLS.items() if cfg.slowmo.enabled and cfg.dist.replica_size == 1)
TAU, BATCH, LENGTH, VOCAB = 12, 8, 64, 2000


class Encoder(nn.Module):
    """A small Transformer language model: embedding, encoder layers (FSDP2's blocks), a linear head."""

    def __init__(self, layers: int = 4, width: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True) for _ in range(layers)
        )
        self.head = nn.Linear(width, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _nbytes(tensors) -> int:
    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size() for t in tensors)


def _memory(model: nn.Module, opt) -> dict[str, int]:
    """Bytes this rank holds: parameters, gradients, the base optimizer's state, the outer state."""
    params = list(model.parameters())
    state = [v for s in opt.base_optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    update = getattr(opt, "update", None)
    outer = [t for t in (update.state_dict().values() if update is not None else []) if torch.is_tensor(t)]
    return {
        "parameters": _nbytes(params),
        "gradients": _nbytes([p.grad for p in params if p.grad is not None]),
        "base optimizer": _nbytes(state),
        "outer state": _nbytes(outer),
    }


def _train(comm, rounds: int, steps: int, warmup: int) -> dict:
    g = torch.Generator().manual_seed(comm.rank)
    tokens = torch.randint(0, VOCAB, (BATCH, LENGTH + 1), generator=g)
    runs = []
    for cfg in CELLS.values():
        torch.manual_seed(0)
        model, across = place_model(cfg, Encoder(), comm, "cpu")
        runs.append((model, optimizer(across, model, cfg)))

    def steps_of(model, opt, count: int) -> None:
        for _ in range(count):
            logits = model(tokens[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()

    sent = []
    for model, opt in runs:
        steps_of(model, opt, warmup)
        before = comm.stats()
        steps_of(model, opt, TAU)
        after = comm.stats()
        sent.append(
            {
                kind: (n - before.get(kind, 0)) / TAU
                for kind, n in after.items()
                if kind != "total" and n > before.get(kind, 0)
            }
        )
    seconds = interleaved(comm, runs, steps_of, rounds, steps)
    return {"seconds": seconds, "memory": [_memory(model, opt) for model, opt in runs], "sent": sent}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2 * TAU)
    parser.add_argument("--out", type=Path, default=Path("results/sharded"))
    args = parser.parse_args(argv)
    results = spawn(_train, 4, "gloo", args=(args.rounds, args.steps, 2), timeout=1800)
    names = list(CELLS)
    per_round = {n: [args.steps / t for t in s] for n, s in zip(names, results[0]["seconds"], strict=True)}
    reference = names.index(REFERENCE)
    rows = []
    for index, name in enumerate(names):
        memory = {key: max(r["memory"][index][key] for r in results) for key in results[0]["memory"][index]}
        sent = results[0]["sent"][index]
        rows.append(
            {
                "configuration": name,
                "steps/s": round(statistics.median(per_round[name]), 3),
                f"vs {REFERENCE}": round(
                    statistics.median(a / b for a, b in zip(per_round[name], per_round[REFERENCE], strict=True)), 3
                ),
                **{f"{key} (MiB/rank)": round(value / 2**20, 3) for key, value in memory.items()},
                "state vs replicated": round(sum(memory.values()) / sum(results[0]["memory"][reference].values()), 3),
                **{f"{kind} (KiB/step)": round(value / 2**10, 1) for kind, value in sorted(sent.items())},
            }
        )
    fields = list(dict.fromkeys(key for row in rows for key in row))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "sharded.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(row)
    record(args.out, __file__, argv)


if __name__ == "__main__":
    main()
