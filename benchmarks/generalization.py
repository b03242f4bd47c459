"""The paper's generalization claim, with the paper's protocol, on MNIST-1D (offline, CPU).

SlowMo's headline (Table 1) is better optimization *and* better test accuracy than the base algorithm. This benchmark
runs the protocol that claim implies, on the ``generalization_mnist1d`` preset (16 simulated ranks, the 1D CNN, the
image schedule: linear warm-up then step decay, tau = 12, alpha = 1, Local SGD with H = tau):

1. **Tuning, on the validation split only.** For each cell (AR-SGD, Local SGD, SGP, OSGP, each without and with
   SlowMo) the base lr is chosen from ``LRS`` and, with SlowMo, beta from the paper's grid ``BETAS``, by the mean
   best validation accuracy over ``TUNE_SEEDS``. (SlowMo raises the effective step to about alpha gamma / (1 -
   beta): an untuned lr would credit SlowMo with what a larger lr gives.)
2. **Evaluation.** Each cell at its tuned lr (and beta) with every seed of ``SEEDS`` (the same seeds in every cell,
   equal inner steps); the test accuracy is read at the best-validation evaluation, on mnist1d's held-out test split
   that no choice looked at. A run whose loss became non-finite is reported (its numbers up to then, and where it
   stopped), never dropped.
3. **Table-1-shaped result**: best train loss and test accuracy, mean ± std; each ± SlowMo difference paired by seed,
   with its 95 % t interval and the paired t-test's p-value. First of all: does plain Local SGD lose accuracy to
   AR-SGD here (the regime where the claim can show)?
4. **Ablations** on the same benchmark: beta (the tuning runs, at each cell's tuned lr) and tau in ``TAUS`` (Local
   SGD, H = tau, ± SlowMo at Local SGD's tuned settings); and the two pseudo-gradient conventions, SlowMo's
   Delta / gamma_t against BMUF's and DiLoCo's raw Delta (``slowmo.pseudo_gradient=raw``, alpha = 1: equal under a
   constant lr, different after each lr decay), on every SlowMo cell at its tuned settings.

Writes ``results/generalization/``: ``runs.csv`` (every run: its overrides, status and numbers), ``table.md``,
``paired.md``, ``ablations.md``, ``curves.png``, ``beta.png``, ``tau.png`` and ``provenance.json``. Run directories go
to ``runs/generalization/`` (not committed); a finished run is not run again. One run:
``python experiments/mnist1d/train.py +experiment=generalization_mnist1d <its overrides>``.

    python benchmarks/generalization.py            # 110 runs, 81 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
from scipy import stats

from slowmo import report
from slowmo.cells import run_cells

from readme import record

PRESET = "generalization_mnist1d"
ALGORITHMS = ("allreduce", "localsgd", "sgp", "osgp")
LRS = (0.1, 0.2)  # 0.05 under-fits every cell in 60 epochs (first pass: never chosen, 78-83 % for AR-SGD)
BETAS = (0.4, 0.5, 0.6, 0.7, 0.8)
SEEDS = (0, 1, 2, 3, 4)
TUNE_SEEDS = (0,)
TAUS = (6, 12, 24, 48)
LABELS = {"allreduce": "AR-SGD", "localsgd": "Local SGD", "sgp": "SGP", "osgp": "OSGP"}


def overrides(algorithm: str, slowmo: bool, lr: float, beta: float | None, seed: int, **extra: str) -> list[str]:
    out = [f"algorithm={algorithm}", f"slowmo={'on' if slowmo else 'off'}", f"optimizer.lr={lr}"]
    out += [f"slowmo.beta={beta}"] if slowmo else []
    return out + [f"{key}={value}" for key, value in extra.items()] + [f"seed={seed}"]


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


def mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.2f} ± {np.std(values):.2f}"


def loss_and_accuracy(rs: list[dict]) -> str:
    """Two table cells: mean best train loss, and test accuracy at the best validation point (mean ± std)."""
    return f"{np.mean([r['best_train_loss'] for r in rs]):.4f} | {mean_std([r['test_acc_at_best_val'] for r in rs])}"


def paired(with_: list[float], without: list[float]) -> tuple[float, float, float, float]:
    """Mean of the seed-by-seed differences, its 95 % t interval and the paired t-test's two-sided p-value."""
    diff = np.asarray(with_) - np.asarray(without)
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    return (
        float(diff.mean()),
        float(diff.mean() - half),
        float(diff.mean() + half),
        float(stats.ttest_rel(with_, without).pvalue),
    )


def ablation_figure(series: dict[str, tuple[list[float], list[list[dict]]]], xlabel: str, path: Path) -> None:
    """Best train loss and test accuracy (mean ± std over seeds) against the ablated setting, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, (xs, groups) in series.items():
        for ax, key in zip(axes, ("best_train_loss", "test_acc_at_best_val"), strict=True):
            values = [[r[key] for r in g] for g in groups]
            ax.errorbar(
                xs, [np.mean(v) for v in values], yerr=[np.std(v) for v in values], marker="o", capsize=3, label=name
            )
    axes[0].set(yscale="log", xlabel=xlabel, ylabel="best train loss")
    axes[1].set(xlabel=xlabel, ylabel="test accuracy at best val (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"MNIST-1D, 16 simulated ranks: {xlabel} ablation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    parser.add_argument("--runs", type=Path, default=Path("runs/generalization"))
    parser.add_argument("--out", type=Path, default=Path("results/generalization"))
    parser.add_argument(
        "--no-ablations", action="store_true", help="skip the tau and pseudo-gradient ablations (beta's is free)"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    runner = Runner(args.runs, args.jobs)
    cells = [(a, s) for a in ALGORITHMS for s in (False, True)]

    # 1. tuning on the validation split
    grid = {c: [(lr, b) for lr in LRS for b in (BETAS if c[1] else (None,))] for c in cells}
    keys = [(c, p) for c in cells for p in grid[c]]
    results = runner([overrides(*c, *p, seed) for c, p in keys for seed in TUNE_SEEDS])  # all at once: one pool
    tuning = {c: {} for c in cells}
    for i, (c, p) in enumerate(keys):
        tuning[c][p] = results[i * len(TUNE_SEEDS) : (i + 1) * len(TUNE_SEEDS)]

    def score(rs: list[dict]) -> float:  # a run that diverged before any evaluation counts as 0 %
        return float(np.mean([np.nan_to_num(r["best_val_acc"]) for r in rs]))

    tuned = {c: max(grid[c], key=lambda p: score(tuning[c][p])) for c in cells}

    # 2. every seed at the tuned settings
    final = {c: runner([overrides(*c, *tuned[c], seed) for seed in SEEDS]) for c in cells}

    # 3. the table and the paired differences
    lines = [
        "| run | lr | beta | best train loss | test acc at best val (%) | best val acc (%) | diverged |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        rs, (lr, beta) = final[c], tuned[c]
        lines.append(
            f"| {LABELS[c[0]]}{' + SlowMo' if c[1] else ''} | {lr} | {beta if beta is not None else '-'} | "
            f"{np.mean([r['best_train_loss'] for r in rs]):.4f} ± {np.std([r['best_train_loss'] for r in rs]):.4f} | "
            f"{mean_std([r['test_acc_at_best_val'] for r in rs])} | {mean_std([r['best_val_acc'] for r in rs])} | "
            f"{sum(r['status'] == 'diverged' for r in rs)}/{len(rs)} |"
        )
    table = "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(table)

    def test_accs(c: tuple[str, bool]) -> list[float]:
        return [r["test_acc_at_best_val"] for r in final[c]]

    rows = ["| comparison (test acc, points) | mean difference | 95 % interval | p (paired t) |", "|---|---|---|---|"]
    comparisons = [("Local SGD − AR-SGD (the regime check)", ("localsgd", False), ("allreduce", False))]
    comparisons += [(f"{LABELS[a]} + SlowMo − {LABELS[a]}", (a, True), (a, False)) for a in ALGORITHMS]
    for name, x, y in comparisons:
        mean, low, high, p = paired(test_accs(x), test_accs(y))
        rows.append(f"| {name} | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] | {p:.3f} |")
    paired_md = "\n".join(rows) + "\n"
    (args.out / "paired.md").write_text(paired_md)

    # 4. ablations: beta (the tuning runs), tau, and the two pseudo-gradient conventions
    taus = (
        {}
        if args.no_ablations
        else {
            (tau, s): runner(
                [
                    overrides(
                        "localsgd",
                        s,
                        *(tuned[("localsgd", s)]),
                        seed,
                        **({"slowmo.tau": str(tau)} if tau != 12 else {}),
                    )
                    for seed in SEEDS[:3]
                ]
            )
            for tau in TAUS
            for s in (False, True)
        }
    )
    raw = (
        {}
        if args.no_ablations
        else {
            a: runner(
                [overrides(a, True, *tuned[(a, True)], seed, **{"slowmo.pseudo_gradient": "raw"}) for seed in SEEDS[:3]]
            )
            for a in ALGORITHMS
        }
    )
    ab = ["| ablation | setting | best train loss | test acc at best val (%) |", "|---|---|---|---|"]
    for a in ALGORITHMS:
        lr = tuned[(a, True)][0]
        for b in BETAS:
            rs = tuning[(a, True)][(lr, b)]
            ab.append(f"| beta, {LABELS[a]} + SlowMo (lr {lr}, {len(rs)} seeds) | {b} | {loss_and_accuracy(rs)} |")
    for (tau, s), rs in taus.items():
        ab.append(f"| tau, Local SGD{' + SlowMo' if s else ''} (H = tau, 3 seeds) | {tau} | {loss_and_accuracy(rs)} |")
    for a in raw:
        mean, low, high, p = paired([r["test_acc_at_best_val"] for r in raw[a]], test_accs((a, True))[:3])
        ab.append(
            f"| raw Δ instead of Δ/γ, {LABELS[a]} + SlowMo (3 seeds; test acc paired: {mean:+.2f} "
            f"[{low:+.2f}, {high:+.2f}], p = {p:.3f}) | raw | {loss_and_accuracy(raw[a])} |"
        )
    ablations = "\n".join(ab) + "\n"
    betas = {
        f"{LABELS[a]} + SlowMo": (list(BETAS), [tuning[(a, True)][(tuned[(a, True)][0], b)] for b in BETAS])
        for a in ALGORITHMS
    }
    ablation_figure(betas, "beta", args.out / "beta.png")
    tau_lines = {
        f"Local SGD{' + SlowMo' if s else ''}": (list(TAUS), [taus[(t, s)] for t in TAUS]) for s in (False, True)
    }
    if taus:
        ablation_figure(tau_lines, "tau", args.out / "tau.png")
    (args.out / "ablations.md").write_text(ablations)

    with open(args.out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(next(iter(runner.done.values()))))
        writer.writeheader()
        writer.writerows(runner.done.values())
    finished = [
        report.load_run(args.runs / ",".join(overrides(*c, *tuned[c], seed)))
        for c in cells
        for seed in SEEDS
        if (args.runs / ",".join(overrides(*c, *tuned[c], seed)) / "summary.json").is_file()
    ]
    report.figure(
        finished,
        args.out / "curves.png",
        "epoch",
        "MNIST-1D, 16 simulated ranks, tuned lr and beta, 5 seeds (mean ± std)",
    )
    wall = time.time() - start
    record(
        args.out,
        __file__,
        argv,
        preset=f"configs/experiment/{PRESET}.yaml",
        runs=len(runner.done),
        tuned={f"{a}{'+slowmo' if s else ''}": {"lr": p[0], "beta": p[1]} for (a, s), p in tuned.items()},
        runs_at_a_time=args.jobs,
        wall_time_s=round(wall),  # of this invocation (finished runs are not run again)
        run_time_s=round(  # every run's own time, summed (diverged runs excluded)
            sum(
                json.loads((args.runs / key / "summary.json").read_text())["wall_time"]
                for key in runner.done
                if (args.runs / key / "summary.json").is_file()
            )
        ),
    )
    print(f"{table}\n{paired_md}\n{ablations}\ndone: {len(runner.done)} runs in {wall:.0f} s")


if __name__ == "__main__":
    main()
