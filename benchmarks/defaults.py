"""Defaults that train: every task that declares ``defaults_checked`` (digits, MNIST-1D, the teacher-student task: data
on the machine, minutes on a CPU) at its own defaults (``configs/task/<task>.yaml``), each base
algorithm without and with every outer step (``slowmo=off``, ``on``, ``bmuf``, ``lookahead``, ``diloco``), on 2 and 4
simulated ranks, 3,000 inner steps; a run diverges when its train loss climbs back to its start after halving
(:mod:`slowmo.train.divergence`) or becomes non-finite. The simulated ranks compute as gloo ranks do (one command, the
same numbers bit for bit on both backends; ``tests/system/test_gloo.py``), so these runs stand for both.

Writes ``results/defaults/``: ``runs.csv`` (every run: its overrides, status, best and final validation metric) and
``table.md`` (per task and outer step: the runs that diverged, and the worst final metric). Run directories go to
``runs/defaults/``; a finished run is not run again.

    python benchmarks/defaults.py   # 3 tasks x 4 bases x 5 outer steps x 2 world sizes: 120 runs
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from slowmo import report
from slowmo.cells import run_cells
from slowmo.tasks import TASKS
from slowmo.train.config import CONFIG_DIR

from readme import record

STEPS = 3000
WORLD_SIZES = (2, 4)


def options(group: str) -> list[str]:
    """A config group's options (its YAML files)."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    checked = [entry.name for entry in TASKS if entry.extra.get("defaults_checked")]
    parser.add_argument("--tasks", nargs="+", default=checked)
    parser.add_argument("--outer", nargs="+", default=options("slowmo"), help="the outer steps (slowmo=...) to run")
    parser.add_argument("--set", nargs="*", default=[], help="overrides on top of the defaults (a candidate default)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    parser.add_argument("--runs", type=Path, default=Path("runs/defaults"))
    parser.add_argument("--out", type=Path, default=Path("results/defaults"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    cells = [
        [f"task={task}", f"algorithm={algorithm}", f"slowmo={outer}", f"dist.world_size={world}",
         f"train.max_steps={STEPS}", "logger.progress=false", *args.set]
        for task in args.tasks for algorithm in options("algorithm") for outer in args.outer
        for world in WORLD_SIZES
    ]  # fmt: skip
    rows = []
    for cell, directory in zip(cells, run_cells(None, cells, args.runs, args.jobs), strict=True):
        numbers = report.load_run(directory)["numbers"]
        metric = numbers["main_metric"]
        rows.append({"overrides": " ".join(cell[:4]), "status": numbers["status"],
                     "best": round(numbers[f"best_{metric}"], 2), "final": round(numbers[f"final_{metric}"], 2),
                     "metric": metric})  # fmt: skip
    with open(args.out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| task | outer step | runs | diverged | worst final metric (run) |", "|---|---|---|---|---|"]
    for task in args.tasks:
        for outer in args.outer:
            members = [
                r
                for r in rows
                if r["overrides"].startswith(f"task={task} ") and f" slowmo={outer} " in r["overrides"] + " "
            ]
            worst = min(members, key=lambda r: r["final"])
            bad = [r["overrides"].split(" ", 1)[1] for r in members if r["status"] == "diverged"]
            lines.append(f"| {task} | {outer} | {len(members)} | {', '.join(bad) or 'none'} | "
                         f"{worst['final']} {worst['metric']} ({worst['overrides'].split(' ', 1)[1]}) |")  # fmt: skip
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    record(args.out, __file__, argv, steps=STEPS, world_sizes=list(WORLD_SIZES), runs=len(rows),
           wall_time_s=round(time.time() - start))  # fmt: skip
    print((args.out / "table.md").read_text())


if __name__ == "__main__":
    main()
