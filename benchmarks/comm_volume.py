"""Bytes each rank sends per inner step, counted by the communicator, beside the formula.

For AllReduce, Local SGD (period H), SGP and OSGP, each without and with SlowMo (tau), on 2, 4 and 8 simulated
ranks, for a ResNet-18 (CIFAR stem, 11.2 M parameters) and the digits MLP (8,970 parameters). Gradients are
random (no data is needed to count bytes); the optimizer steps are the real ones. With n ranks, B = |θ| x 4 bytes
(fp32, parameters plus floating buffers for the exact averages, which also carry BatchNorm statistics), and T
inner steps:

- ring all-reduce: 2 (n - 1) / n x B per call;
- AllReduce: one call per step (gradients: parameters only);
- Local SGD: one call (of the model: parameters + buffers) every H steps;
- SGP / OSGP: (|θ| + 1) x 4 per step, to one peer (the +1 is the push-sum weight);
- the one-time broadcast of rank 0's initial parameters (first step) is left out;
- SlowMo: one exact average (parameters, then buffers) every tau steps; with Local SGD, when an average of its own
  falls on an outer step it is skipped (the outer one replaces it); with SGP / OSGP, the gossip round of an outer
  step is skipped (the exact average overwrites it); with AllReduce, whose ranks hold equal parameters, only the
  buffers are averaged.

Writes ``results/comm_volume/``: ``comm_volume.csv`` and its ``README.md``. Run: ``python benchmarks/comm_volume.py``
(about 10 minutes on 2 cores: 8 simulated ResNet-18s).
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import torch

from slowmo import SGP, AllReduce, LocalSGD
from slowmo.algorithms import Algorithm
from slowmo.comm import spawn
from slowmo.models import build_model
from slowmo.train.config import Config

from common import config, optimizer, suite
from readme import record

SUITE = suite("comm_volume")  # configs/benchmark/comm_volume.yaml
STEPS = 24  # a multiple of H = 4 and tau = 12: whole periods only


def model_for(overrides: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(config([overrides]).model, num_classes=10, input_shape=tuple(SUITE["models"][overrides]))


def measure(comm, model_overrides: str, cfg: Config) -> tuple[int, float]:
    """The bytes this rank sent in STEPS steps, and the formula's bytes per step."""
    model = model_for(model_overrides)
    opt = optimizer(comm, model, cfg)
    generator = torch.Generator().manual_seed(comm.rank)
    for _ in range(STEPS):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator) * 1e-3
        opt.step()
    stats = comm.stats()
    sent = stats["total"] - stats.get("broadcast", 0)  # not the one-time broadcast of rank 0's initial model
    return sent, theory(model, opt.algorithm, cfg, comm.world_size)


def theory(model: torch.nn.Module, algorithm: Algorithm, cfg: Config, n: int) -> float:
    params = sum(p.numel() for p in model.parameters()) * 4
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point()) * 4
    ring = 2 * (n - 1) / n  # bytes sent per byte all-reduced (ring)
    gossip = params + 4
    if isinstance(algorithm, AllReduce):
        per_step = ring * params
    elif isinstance(algorithm, LocalSGD):
        per_step = ring * (params + buffers) / algorithm.period
    else:
        assert isinstance(algorithm, SGP)  # (and OSGP)
        per_step = gossip
    if cfg.slowmo.enabled:
        tau = cfg.slowmo.tau
        per_step += ring * (buffers if isinstance(algorithm, AllReduce) else params + buffers) / tau
        if isinstance(algorithm, LocalSGD):  # the Local SGD averages that fall on an outer step are skipped
            per_step -= ring * (params + buffers) / math.lcm(algorithm.period, tau)
        if isinstance(algorithm, SGP):  # so is the gossip round of an outer step
            per_step -= gossip / tau
    return per_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/comm_volume"))
    args = parser.parse_args(argv)
    rows = []
    cells = {name: config(SUITE["base"].split(), cell) for name, cell in SUITE["cells"].items()}
    for model_overrides in SUITE["models"]:
        model_name = config([model_overrides]).model.name
        param_bytes = sum(p.numel() for p in model_for(model_overrides).parameters()) * 4
        for n in (2, 4, 8):
            for name, cfg in cells.items():
                measured = spawn(measure, n, "simulated", args=(model_overrides, cfg))
                sent = [bytes_ for bytes_, _ in measured]
                assert len(set(sent)) == 1, f"ranks sent different amounts: {sent}"
                rows.append(
                    {
                        "model": model_name,
                        "algorithm": cfg.algorithm.name,
                        "slowmo": cfg.slowmo.enabled,
                        "world_size": n,
                        "period_H": getattr(cfg.algorithm, "period", None) or "",
                        "tau": cfg.slowmo.tau if cfg.slowmo.enabled else "",
                        "param_bytes": param_bytes,
                        "bytes_per_step_measured": sent[0] / STEPS,
                        "bytes_per_step_theory": measured[0][1],
                    }
                )
                r = rows[-1]
                print(
                    f"{model_name:>8} n={n} {name:>18} {r['bytes_per_step_measured']:>14,.1f} B/step   "
                    f"theory {r['bytes_per_step_theory']:>14,.1f}",
                    flush=True,
                )
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "comm_volume.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    worst = max(abs(r["bytes_per_step_measured"] - r["bytes_per_step_theory"]) for r in rows)
    print(f"wrote {args.out}/comm_volume.csv: {len(rows)} rows, largest |measured - theory| = {worst:.3g} B/step")
    record(args.out, __file__, argv)


if __name__ == "__main__":
    main()
