"""``slowmo-quickstart``: SlowMo's effect in about two minutes, offline, on the CPU.

Runs every cell of the ``quickstart`` preset's sweep (``configs/experiment/quickstart.yaml``: 8 simulated ranks on
scikit-learn's digits, AR-SGD / Local SGD / SGP, each without and with SlowMo, 3 seeds, equal steps), then prints a
table (train loss and validation accuracy, mean ± sample std over seeds; bytes each rank sent; time) and draws the train
loss. The runs go to ``--runs`` (default ``runs/quickstart``, not committed): a second call resumes a cell that stopped
and does not run a finished one again (``--fresh``: every cell anew, ``train.overwrite=true``); the table
(``table.md``, ``table.csv``) and ``loss.png`` to ``--out`` (default: the same).
The committed ``results/quickstart/`` is refreshed only by ``slowmo-quickstart --out results/quickstart``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import report
from .cells import run_cells
from .train.config import sweep

PRESET = "quickstart"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/quickstart"), help="where the run directories go")
    parser.add_argument("--out", type=Path, default=None, help="where the table and figure go (default: --runs)")
    parser.add_argument("--fresh", action="store_true", help="run every cell anew (default: resume, skip finished)")
    args = parser.parse_args(argv)
    out = args.out or args.runs
    start = time.time()
    again = "make quickstart" if args.runs == Path("runs/quickstart") else f"slowmo-quickstart --runs {args.runs}"
    runs = [report.load_run(d) for d in run_cells(PRESET, sweep(PRESET), args.runs, fresh=args.fresh, rerun=again)]
    command = f"slowmo-quickstart (+experiment={PRESET}, the preset's sweep)"
    markdown = report.write_table(report.table(runs), out, command)
    setup = next(run["config"] for run in runs if run["config"]["slowmo"]["enabled"])  # a SlowMo cell's tau and beta
    report.figure(
        runs,
        out / "loss.png",
        "step",
        f"digits, {setup['dist']['world_size']} simulated ranks, {setup['train']['max_steps']} steps "
        f"(tau = {setup['slowmo']['tau']}, beta = {setup['slowmo']['update']['beta']})",
    )
    print()
    print(markdown)
    print(f"wrote {out}/table.csv, table.md, loss.png in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
