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

from slowmo.comm import spawn
from slowmo.models import ModelConfig, build_model
from slowmo.models.small import SmallConfig

from common import optimizer
from readme import record

H, TAU, STEPS = 4, 12, 24  # STEPS is a multiple of both: whole periods only


def model_for(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":
        return build_model(ModelConfig("resnet18"), num_classes=10, input_shape=(3, 32, 32))
    return build_model(SmallConfig("mlp", 64), num_classes=10, input_shape=(1, 8, 8))


def measure(comm, model_name: str, algorithm: str, slowmo_on: bool) -> int:
    model = model_for(model_name)
    opt = optimizer(comm, model, algorithm, H, slowmo={"tau": TAU, "update": {"beta": 0.5}} if slowmo_on else None)
    generator = torch.Generator().manual_seed(comm.rank)
    for _ in range(STEPS):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator) * 1e-3
        opt.step()
    stats = comm.stats()
    return stats["total"] - stats.get("broadcast", 0)  # not the one-time broadcast of rank 0's initial model


def theory(model: torch.nn.Module, algorithm: str, slowmo_on: bool, n: int) -> float:
    params = sum(p.numel() for p in model.parameters()) * 4
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point()) * 4
    ring = 2 * (n - 1) / n  # bytes sent per byte all-reduced (ring)
    gossip = params + 4
    per_step = {"allreduce": ring * params, "localsgd": ring * (params + buffers) / H, "sgp": gossip, "osgp": gossip}[
        algorithm
    ]
    if slowmo_on:
        per_step += ring * (buffers if algorithm == "allreduce" else params + buffers) / TAU
        if algorithm == "localsgd":  # the Local SGD averages that fall on an outer step are skipped
            per_step -= ring * (params + buffers) / math.lcm(H, TAU)
        if algorithm in ("sgp", "osgp"):  # so is the gossip round of an outer step
            per_step -= gossip / TAU
    return per_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/comm_volume"))
    args = parser.parse_args(argv)
    rows = []
    for model_name in ("resnet18", "mlp"):
        model = model_for(model_name)
        param_bytes = sum(p.numel() for p in model.parameters()) * 4
        for n in (2, 4, 8):
            for algorithm in ("allreduce", "localsgd", "sgp", "osgp"):
                for slowmo_on in (False, True):
                    sent = spawn(measure, n, "simulated", args=(model_name, algorithm, slowmo_on))
                    assert len(set(sent)) == 1, f"ranks sent different amounts: {sent}"
                    rows.append(
                        {
                            "model": model_name,
                            "algorithm": algorithm,
                            "slowmo": slowmo_on,
                            "world_size": n,
                            "period_H": H if algorithm == "localsgd" else "",
                            "tau": TAU if slowmo_on else "",
                            "param_bytes": param_bytes,
                            "bytes_per_step_measured": sent[0] / STEPS,
                            "bytes_per_step_theory": theory(model, algorithm, slowmo_on, n),
                        }
                    )
                    r = rows[-1]
                    print(
                        f"{model_name:>8} n={n} {algorithm:>9}{' + SlowMo' if slowmo_on else '         '} "
                        f"{r['bytes_per_step_measured']:>14,.1f} B/step   theory {r['bytes_per_step_theory']:>14,.1f}",
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
