"""Beyond SlowMo at equal inner steps: each variant of the README's "Beyond SlowMo" table against plain SlowMo, on the
MNIST-1D block of the fidelity benchmark (preset ``fidelity_mnist1d``: 16 simulated ranks, Local SGD with H = tau =
12, SGD + Nesterov under the step schedule; here each rank's gradient clipped at norm 1), the same seeds in every cell.

Plain SlowMo runs at lr 0.1 and beta 0.7 (alpha = 1). Each variant changes one thing: int8, fp8 or fp4 pseudo-gradients
with error feedback, the eager outer step, streaming fragments (P = 4: the CNN's 3 convolutions and its head, one
fragment every 3 steps, each merged d = 2 steps after its launch, or at once, d = 0, which isolates the fragments
from the delay), torch's Nesterov outer step instead of the heavy ball, and post-local SGD (the first 78 steps
data-parallel). The papers claim these match the synchronous method at equal steps; each row gives the mean ± sample std
over the seeds and the seed-by-seed (paired) difference in test accuracy against plain SlowMo, with its 95 % t
interval and p-value. Eager and streaming at d = 2 are then tuned (``TUNED``: beta, outer Nesterov, the mixing
factor; the grid on seed 0, the best validation accuracy chosen) and the chosen setting is run on every seed.

Writes ``results/beyond/``: ``table.md``, ``accuracy.png``, ``runs.csv`` and ``provenance.json``. Run directories go to
``runs/beyond/`` (a finished run is not run again).

    python benchmarks/beyond.py            # 43 runs, about 28 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
from fidelity import paired

from slowmo import report
from slowmo.cells import run_cells
from slowmo.report import mean_std

from common import suite
from readme import record

SUITE = suite("beyond")  # configs/benchmark/beyond.yaml
PRESET, BASE, VARIANTS = SUITE["preset"], SUITE["base"].split(), SUITE["cells"]
PLAIN = next(iter(VARIANTS))  # plain SlowMo, every variant's reference
TUNED = {name: [line.split() for line in grid] for name, grid in SUITE["tuned"].items()}
SEEDS = (0, 1, 2)


def figure(by_name: dict[str, list[dict]], path: Path, low: float = -20.0) -> None:
    """Each variant's test accuracy minus plain SlowMo's, seed by seed (dots) and their mean (bar); a mean below
    ``low`` is drawn to the edge and written out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain = np.array([r["test_acc_at_best_val"] for r in by_name[PLAIN]])
    names = [name for name in by_name if name != PLAIN]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(names) + 1.4))
    for y, name in enumerate(names):
        diff = np.array([r["test_acc_at_best_val"] for r in by_name[name]]) - plain
        ax.barh(y, max(diff.mean(), low), color="tab:blue" if diff.mean() >= 0 else "tab:red", alpha=0.4)
        ax.plot(np.maximum(diff, low), [y] * len(diff), "k.")
        if diff.mean() < low:
            ax.text(low + 0.5, y, f"mean {diff.mean():+.1f}", va="center", fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlim(low, max(8.0, ax.get_xlim()[1]))
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="test accuracy minus plain SlowMo's, same seed (points)\ndots: seeds, bar: their mean")
    ax.set_title("MNIST-1D, 16 simulated ranks, Local SGD + SlowMo, equal inner steps", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


FIELDS = ("status", "best_train_loss", "best_val_acc", "test_acc_at_best_val", "epoch_of_best_val", "steps")


class Runner:
    """The preset's cells, run (:func:`slowmo.cells.run_cells`) and read (:func:`slowmo.report.load_run`): each run's
    overrides and figures (the best train loss, the best validation accuracy and the test accuracy of that
    evaluation, the first one on ties; finished or diverged alike)."""

    def __init__(self, runs: Path, jobs: int) -> None:
        self.runs, self.jobs, self.done = runs, jobs, {}

    def __call__(self, cells: list[list[str]]) -> list[dict]:
        todo = [cell for cell in cells if ",".join(cell) not in self.done]
        for cell, run_dir in zip(todo, run_cells(PRESET, todo, self.runs, self.jobs), strict=True):
            numbers = report.load_run(run_dir)["numbers"]
            overrides = " ".join([f"+experiment={PRESET}", *cell])
            self.done[",".join(cell)] = {"overrides": overrides, **{key: numbers[key] for key in FIELDS}}
        return [self.done[",".join(cell)] for cell in cells]


def cell(extra: list[str], seed: int) -> list[str]:
    """BASE with ``extra`` on top (an extra key, or its deletion ``~key``, replaces BASE's), then the seed."""
    keys = {o.lstrip("~").split("=")[0] for o in extra}
    return [*(o for o in BASE if o.split("=")[0] not in keys), *extra, f"seed={seed}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    parser.add_argument("--runs", type=Path, default=Path("runs/beyond"))
    parser.add_argument("--out", type=Path, default=Path("results/beyond"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    runner = Runner(args.runs, args.jobs)
    grids = [extra for grid in TUNED.values() for extra in grid]
    cells = [cell(extra, seed) for extra in VARIANTS.values() for seed in SEEDS] + [cell(e, 0) for e in grids]
    results = runner(cells)  # one pool: the fixed variants and the tuning grids
    by_name = {name: results[i * len(SEEDS) : (i + 1) * len(SEEDS)] for i, name in enumerate(VARIANTS)}
    tuning_lines = ["| variant | overrides on top of the base | seed-0 best val acc (%) |", "|---|---|---|"]
    chosen = {}
    for name, grid in TUNED.items():
        scores = [np.nan_to_num(runner([cell(extra, 0)])[0]["best_val_acc"]) for extra in grid]
        chosen[name] = grid[int(np.argmax(scores))]
        tuning_lines += [f"| {name} | {' '.join(e)} | {v:.2f} |" for e, v in zip(grid, scores, strict=True)]
    tuned = runner([cell(extra, seed) for extra in chosen.values() for seed in SEEDS])
    for i, (name, extra) in enumerate(chosen.items()):
        label = f"{name}: {' '.join(o.removeprefix('slowmo.') for o in extra)}"
        by_name[label] = tuned[i * len(SEEDS) : (i + 1) * len(SEEDS)]
    plain = [r["test_acc_at_best_val"] for r in by_name[PLAIN]]
    lines = [
        "| variant | best train loss | test acc at best val (%) | paired vs SlowMo (points) | 95 % interval | p |",
        "|---|---|---|---|---|---|",
    ]
    for name, rs in by_name.items():
        losses, accs = [r["best_train_loss"] for r in rs], [r["test_acc_at_best_val"] for r in rs]
        row = f"| {name} | {mean_std(losses, 4)} | {mean_std(accs)} |"
        if name == PLAIN:
            lines.append(row + " - | - | - |")
        else:
            mean, low, high, p, _ = paired(accs, plain)
            lines.append(row + f" {mean:+.2f} | [{low:+.2f}, {high:+.2f}] | {p:.3f} |")
    table = "\n".join(lines) + "\n\nTuning (seed 0):\n\n" + "\n".join(tuning_lines) + "\n"
    (args.out / "table.md").write_text(table)
    figure(by_name, args.out / "accuracy.png")
    with open(args.out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(results[0]))
        writer.writeheader()
        writer.writerows(runner.done.values())
    wall = time.time() - start
    record(
        args.out,
        __file__,
        argv,
        preset=f"configs/experiment/{PRESET}.yaml",
        base=BASE,
        seeds=list(SEEDS),
        tuning_grids_seed_0=TUNED,
        runs_at_a_time=args.jobs,
        wall_time_s=round(wall),
    )
    print(f"{table}\ndone: {len(runner.done)} runs in {wall:.0f} s")


if __name__ == "__main__":
    main()
