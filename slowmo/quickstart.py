"""``slowmo-quickstart``: SlowMo's effect in a few minutes, offline, on the CPU.

8 simulated ranks train an MLP on scikit-learn's digits with AR-SGD, Local SGD, Local SGD + SlowMo, SGP and
SGP + SlowMo for the same number of steps (tau = 12, alpha = 1, beta = 0.7); prints a table (final train loss,
validation accuracy, bytes each rank sent, time) and writes ``results/quickstart/`` (runs, table.csv, table.md,
loss.png)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import report
from .train import run

RUNS = {  # name: (algorithm overrides, SlowMo on)
    "ar_sgd": ({"name": "allreduce"}, False),
    "local_sgd": ({"name": "localsgd", "period": 12}, False),
    "local_sgd_slowmo": ({"name": "localsgd", "period": 12}, True),
    "sgp": ({"name": "sgp"}, False),
    "sgp_slowmo": ({"name": "sgp"}, True),
}


def config(name: str, out: Path, steps: int, world_size: int, seed: int) -> dict:
    algorithm, slowmo_on = RUNS[name]
    return {"task": {"name": "digits"}, "model": {"name": "mlp", "width": 64},
            "data": {"batch_size": 16}, "algorithm": algorithm,
            "slowmo": {"enabled": slowmo_on, "tau": 12, "alpha": 1.0, "beta": 0.7, "base_buffers": "reset"},
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
            "schedule": {"name": "constant"}, "logger": {"progress": False, "log_every": 12},
            "dist": {"backend": "simulated", "world_size": world_size},
            "train": {"max_steps": steps, "eval_every": 48, "resume": "never"}, "seed": seed,
            "run_dir": str(out / "runs" / name)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/quickstart"))
    parser.add_argument("--steps", type=int, default=480)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.time()
    runs = []
    for name in RUNS:
        t = time.time()
        summary = run(config(name, args.out, args.steps, args.world_size, args.seed))
        print(f"{name:>18}: val_acc {summary['final']['val_acc']:.2f} %  ({time.time() - t:.1f} s)", flush=True)
        runs.append(report.load_run(args.out / "runs" / name))
    markdown = report.write_table(report.table(runs), args.out)
    report.figure(runs, args.out / "loss.png", "step",
                  f"digits, {args.world_size} simulated ranks, {args.steps} steps (tau = 12, beta = 0.7)")
    print()
    print(markdown)
    print(f"wrote {args.out}/table.csv, table.md, loss.png in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
