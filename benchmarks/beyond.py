"""Beyond SlowMo at equal inner steps: each variant of the README's "Beyond SlowMo" table against plain SlowMo, on the
generalization benchmark (MNIST-1D, preset ``generalization_mnist1d``: 16 simulated ranks, Local SGD with H = tau =
12, SGD + Nesterov under the step schedule, gradients clipped at norm 1), the same seeds in every cell.

Plain SlowMo runs at lr 0.1 and beta 0.7 (alpha = 1). Each variant changes one thing: int8 or fp8 pseudo-gradients
with error feedback, the eager outer step, streaming fragments (P = 4: the CNN's 3 convolutions and its head, one
fragment every 3 steps, each merged 2 steps after its launch), torch's Nesterov outer step instead of the heavy ball,
and post-local SGD (the first 78 steps data-parallel). The papers claim these match the synchronous method at equal
steps; each row gives the mean ± std over the seeds and the seed-by-seed (paired) difference in test accuracy against
plain SlowMo, with its 95 % t interval and p-value.

Writes ``results/beyond/``: ``table.md``, ``runs.csv`` and ``provenance.json``. Run directories go to
``runs/generalization/`` (shared with benchmarks/generalization.py; a finished run is not run again).

    python benchmarks/beyond.py            # 21 runs, about 12 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from generalization import PRESET, Runner, mean_std, paired

SEEDS = (0, 1, 2)
BASE = ["algorithm=localsgd", "slowmo=on", "optimizer.lr=0.1", "slowmo.beta=0.7"]
VARIANTS = {  # name -> its overrides on top of BASE
    "SlowMo (Algorithm 1)": [],
    "int8 + error feedback": ["slowmo.compression=int8", "slowmo.error_feedback=true"],
    "fp8 + error feedback": ["slowmo.compression=fp8", "slowmo.error_feedback=true"],
    "eager outer step": ["slowmo.eager=true"],
    "streaming, P = 4, d = 2": ["slowmo.fragments=4", "slowmo.sync_delay=2"],
    "outer Nesterov (torch)": ["slowmo.outer_optimizer=nesterov"],
    "post-local SGD, K = 78": ["algorithm.warmup_steps=78"],
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    parser.add_argument("--runs", type=Path, default=Path("runs/generalization"))
    parser.add_argument("--out", type=Path, default=Path("results/beyond"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    runner = Runner(args.runs, args.jobs)
    cells = {name: [[*BASE, *extra, f"seed={seed}"] for seed in SEEDS] for name, extra in VARIANTS.items()}
    results = runner([cell for runs in cells.values() for cell in runs])
    by_name = {name: results[i * len(SEEDS) : (i + 1) * len(SEEDS)] for i, name in enumerate(cells)}
    plain = [r["test_acc_at_best_val"] for r in by_name["SlowMo (Algorithm 1)"]]
    lines = [
        "| variant | best train loss | test acc at best val (%) | paired vs SlowMo (points) | 95 % interval | p |",
        "|---|---|---|---|---|---|",
    ]
    for name, rs in by_name.items():
        losses, accs = [r["best_train_loss"] for r in rs], [r["test_acc_at_best_val"] for r in rs]
        row = f"| {name} | {np.mean(losses):.4f} ± {np.std(losses):.4f} | {mean_std(accs)} |"
        if name == "SlowMo (Algorithm 1)":
            lines.append(row + " - | - | - |")
        else:
            mean, low, high, p = paired(accs, plain)
            lines.append(row + f" {mean:+.2f} | [{low:+.2f}, {high:+.2f}] | {p:.3f} |")
    table = "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(table)
    with open(args.out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    wall = time.time() - start
    (args.out / "provenance.json").write_text(
        json.dumps(
            {
                "command": "python benchmarks/beyond.py",
                "preset": f"configs/experiment/{PRESET}.yaml",
                "base": BASE,
                "seeds": list(SEEDS),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                f"{args.jobs} runs at a time",
                "wall_time_s": round(wall),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"{table}\ndone: {len(results)} runs in {wall:.0f} s")


if __name__ == "__main__":
    main()
