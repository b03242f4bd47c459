"""Paper-style figures and a table from run directories.

    python scripts/plot.py RUN_DIR [RUN_DIR ...] --out results/my_sweep [--title "CIFAR-10, 8 ranks"]

Writes table.csv, table.md, curves_epoch.png and curves_time.png in --out (and curves_simulated_time.png where every
run ran on the simulator's virtual clock, dist/clock=<scenario>). Runs that differ only in their seed are one
cell (mean line, a band of ± one sample std; mean ± sample std in the table); runs that differ in anything else (lr,
beta, tau, world size, backend, ...) are cells of their own, named by what differs. The default title names the task
and what differs. A sweep's directory may be given instead of its runs."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slowmo import report


def find_runs(paths: list[str]) -> list[Path]:
    """The run directories given, or under the directories given, that got to their end (a preempted or failed run's
    summary.json says so: it is left out, with a note)."""
    found = []
    for path in map(Path, paths):
        found += [path] if (path / "summary.json").is_file() else sorted(p.parent for p in path.rglob("summary.json"))
    unfinished = [d for d in found if not report.finished(d)]
    if unfinished:
        print(f"note: {len(unfinished)} run(s) did not get to their end, left out: {' '.join(map(str, unfinished))}",
              file=sys.stderr)  # fmt: skip
    return [d for d in found if report.finished(d)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories, or directories that contain them")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--title", default=None, help="default: the task and what differs")
    args = parser.parse_args(argv)
    dirs = find_runs(args.runs)
    if not dirs:
        print(
            f"error: no finished run (summary.json: completed or diverged) under {' '.join(args.runs)}", file=sys.stderr
        )
        return 2
    runs = [report.load_run(d) for d in dirs]
    print(report.write_table(report.table(runs), args.out))
    report.figure(runs, args.out / "curves_epoch.png", "epoch", args.title)
    report.figure(runs, args.out / "curves_time.png", "wall_time", args.title)
    written = "table.csv, table.md, curves_epoch.png, curves_time.png"
    if report.on_the_clock(runs):
        report.figure(runs, args.out / "curves_simulated_time.png", "sim_time", args.title)
        written += ", curves_simulated_time.png"
    print(f"wrote {args.out}/{written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
