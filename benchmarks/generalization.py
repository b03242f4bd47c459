"""Table 1 at significance: SlowMo's generalization claim with tuning seeds apart from evaluation seeds, on MNIST-1D.

SlowMo's headline (Table 1) is better optimization *and* better test accuracy than the base algorithm. This benchmark
runs the protocol that claim needs, on the ``generalization_mnist1d`` preset (16 simulated ranks, the 1D CNN, batch
16 per rank, the image schedule: linear warm-up then /10 at epochs 30 and 45 of 60, tau = 12, alpha = 1, Local SGD
with H = tau), for the cells AR-SGD, Local SGD, SGP and OSGP, each without and with SlowMo:

1. **Tuning, on the validation split of the tuning seeds** ``TUNE_SEEDS``, which are not evaluation seeds. A
   setting's score is its best validation accuracy, averaged over the tuning seeds (a run that diverged before any
   evaluation scores 0). Base cells: the lr is searched on the powers-of-two grid ``LRS`` from ``START_LRS``, one
   neighbour at a time, until the best lr has both its neighbours scored and worse: it is then at neither end of
   what was searched (``tuning.md`` says so for every cell, or that it reached the grid's end). SlowMo cells: the
   paper's protocol, the base cell's tuned lr and beta searched the same way on ``BETAS`` (0.1 apart) from
   ``START_BETAS``.
2. **Evaluation.** Each cell at its tuned setting with every seed of ``EVAL_SEEDS`` (the same seeds in every cell,
   equal inner steps); the test accuracy is read at the best-validation evaluation, on mnist1d's held-out test split
   that no choice looked at. A run whose loss became non-finite is reported with its numbers up to then, never
   dropped.
3. **Table 1 and its significance**: best train loss and test accuracy, mean ± std; each ± SlowMo difference paired
   by seed, with its 95 % t interval, the paired t-test's p-value and Holm's correction across the four bases; and
   the regime check, each communication-efficient base − AR-SGD.
4. **Ablations** (skipped with ``--no-ablations``): tau in ``TAUS`` for Local SGD (H = tau) at its tuned lr, beta
   tuned per tau as in the paper, on ``ABLATION_SEEDS``; SlowMo's pseudo-gradient Delta / gamma_t against BMUF's and
   DiLoCo's raw Delta (``slowmo.pseudo_gradient=raw``) on every SlowMo cell at its tuned setting; and beta, read
   from the tuning runs.

``runs.csv`` is the ledger: one row per finished run (``purpose`` ``tune`` or ``evaluate``, its overrides, status and
numbers), appended as the runs finish. A run already in it is not run again, so the protocol spans sittings and
machines and a crash loses at most the runs in flight; every table here is computed from it alone
(``--report`` recomputes them without running anything). Run directories go to ``runs/generalization/`` (not
committed). One run: ``python experiments/mnist1d/train.py +experiment=generalization_mnist1d <its overrides>``.

    python benchmarks/generalization.py               # the whole protocol, resumable: 204 runs, 84 min on 2 cores
    python benchmarks/generalization.py --report      # the tables, recomputed from runs.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from scipy import stats

from slowmo import report
from slowmo.cells import run_cells, run_dir

from readme import record

PRESET = "generalization_mnist1d"
ALGORITHMS = ("allreduce", "localsgd", "sgp", "osgp")
LABELS = {"allreduce": "AR-SGD", "localsgd": "Local SGD", "sgp": "SGP", "osgp": "OSGP"}
LRS = (0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)  # powers of two
START_LRS = (0.1, 0.2, 0.4)  # scored first: the previous protocol chose 0.2, the top of its grid, in every cell
BETAS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
START_BETAS = (0.6, 0.7, 0.8)  # scored first: the previous protocol chose 0.7 or 0.8 in every cell
TAU = 12  # the preset's
TAUS = (6, 12, 24, 48)
TUNE_SEEDS = (1000, 1001)
EVAL_SEEDS = tuple(range(10))
ABLATION_SEEDS = EVAL_SEEDS[:3]
COLUMNS = ("purpose", "algorithm", "slowmo", "lr", "beta", "tau", "pseudo_gradient", "seed", "overrides")
FIGURES = ("status", "best_train_loss", "best_val_acc", "test_acc_at_best_val", "epoch_of_best_val", "steps")
FIELDS = (*COLUMNS, *FIGURES, "run_s")

Setting = tuple[str, bool, float, float | None, int, str]  # algorithm, slowmo, lr, beta, tau, pseudo_gradient


def overrides(setting: Setting, seed: int) -> list[str]:
    algorithm, slowmo, lr, beta, tau, pseudo_gradient = setting
    out = [f"algorithm={algorithm}", f"slowmo={'on' if slowmo else 'off'}", f"optimizer.lr={lr}"]
    out += [f"slowmo.beta={beta}"] if slowmo else []
    out += [f"slowmo.tau={tau}"] if tau != TAU else []
    out += [f"slowmo.pseudo_gradient={pseudo_gradient}"] if pseudo_gradient != "scaled" else []
    return out + [f"seed={seed}"]


def setting_of(row: dict) -> Setting:
    beta = None if row["beta"] in ("", None) else float(row["beta"])
    return (row["algorithm"], row["slowmo"] in (True, "True"), float(row["lr"]), beta, int(row["tau"]),
            row["pseudo_gradient"])  # fmt: skip


# ------------------------------------------------------------------------------------------------ the ledger
class Ledger:
    """``runs.csv``: every finished run's setting, seed, purpose, overrides and figures; :meth:`run` runs what is not
    in it yet (:func:`slowmo.cells.run_cells`, ``jobs`` at a time) and appends each batch as it finishes."""

    def __init__(self, path: Path, runs: Path, jobs: int) -> None:
        self.path, self.runs, self.jobs = path, runs, jobs
        self.rows = list(csv.DictReader(path.open())) if path.is_file() else []
        self.index = {(setting_of(r), int(r["seed"])): r for r in self.rows}

    def run(self, jobs: Iterable[tuple[Setting, int, str]]) -> None:
        """Run every (setting, seed, purpose) not in the ledger yet, in one pool; append them once they finished."""
        todo = [job for job in dict.fromkeys(jobs) if job[:2] not in self.index]
        cells = [overrides(s, seed) for s, seed, _ in todo]
        new = []
        for (s, seed, purpose), cell, directory in zip(
            todo, cells, run_cells(PRESET, cells, self.runs, self.jobs), strict=True
        ):
            numbers = report.load_run(directory)["numbers"]
            summary = directory / "summary.json"
            row = dict(zip(COLUMNS[:-1], (purpose, *s[:3], "" if s[3] is None else s[3], *s[4:], seed), strict=True))
            row["overrides"] = " ".join([f"+experiment={PRESET}", *cell])
            row.update({key: numbers[key] for key in FIGURES})
            row["run_s"] = round(json.loads(summary.read_text())["wall_time"], 1) if summary.is_file() else ""
            new.append({key: str(value) for key, value in row.items()})
        if new:
            fresh = not self.path.is_file()
            with self.path.open("a", newline="") as f:
                writer = csv.DictWriter(f, FIELDS)
                if fresh:
                    writer.writeheader()
                writer.writerows(new)
            self.rows += new
            self.index.update({(setting_of(r), int(r["seed"])): r for r in new})


# ------------------------------------------------------------------------------------------------ reading the ledger
def runs_of(rows: list[dict], setting: Setting, seeds: Iterable[int]) -> list[dict]:
    index = {(setting_of(r), int(r["seed"])): r for r in rows}
    return [index[(setting, seed)] for seed in seeds if (setting, seed) in index]


def value(row: dict, key: str) -> float:
    return float(row[key]) if row[key] not in ("", "nan") else float("nan")


def score(rows: list[dict], setting: Setting) -> float | None:
    """Mean best validation accuracy over the tuning seeds (0 for a run with no evaluation); None until all ran."""
    rs = runs_of(rows, setting, TUNE_SEEDS)
    return float(np.mean([np.nan_to_num(value(r, "best_val_acc")) for r in rs])) if len(rs) == len(TUNE_SEEDS) else None


def search(grid: tuple, start: Iterable, scored: Callable[[float], float | None]) -> tuple[list, float | None]:
    """One round of the grid search: the points still to score (``start`` first, then the best point's unscored
    grid neighbours), and the best point once none is left (None until then)."""
    wanted = [p for p in start if scored(p) is None]
    if wanted:
        return wanted, None
    done = [p for p in grid if scored(p) is not None]
    best = max(done, key=lambda p: (scored(p), -grid.index(p)))  # a tie goes to the smaller value
    i = grid.index(best)
    wanted = [grid[j] for j in (i - 1, i + 1) if 0 <= j < len(grid) and scored(grid[j]) is None]
    return wanted, (None if wanted else best)


def base(algorithm: str, lr: float) -> Setting:
    return (algorithm, False, lr, None, TAU, "scaled")


def with_slowmo(algorithm: str, lr: float, beta: float, tau: int = TAU, pseudo_gradient: str = "scaled") -> Setting:
    return (algorithm, True, lr, beta, tau, pseudo_gradient)


def tuning_round(rows: list[dict]) -> tuple[list[Setting], dict[tuple[str, bool], Setting]]:
    """What the tuning needs scored next (on every tuning seed), and the settings tuned so far, by cell."""
    wanted, tuned = [], {}
    for a in ALGORITHMS:
        lrs, lr = search(LRS, START_LRS, lambda lr, a=a: score(rows, base(a, lr)))
        wanted += [base(a, x) for x in lrs]
        if lr is None:
            continue
        tuned[(a, False)] = base(a, lr)
        betas, beta = search(BETAS, START_BETAS, lambda b, a=a, lr=lr: score(rows, with_slowmo(a, lr, b)))
        wanted += [with_slowmo(a, lr, b) for b in betas]
        if beta is not None:
            tuned[(a, True)] = with_slowmo(a, lr, beta)
    return wanted, tuned


def tau_round(rows: list[dict], lr: float) -> tuple[list[Setting], dict[int, Setting]]:
    """The tau ablation's beta tuning (Local SGD + SlowMo at Local SGD's tuned lr), as :func:`tuning_round`."""
    wanted, tuned = [], {}
    for tau in TAUS:
        betas, beta = search(BETAS, START_BETAS, lambda b, t=tau: score(rows, with_slowmo("localsgd", lr, b, t)))
        wanted += [with_slowmo("localsgd", lr, b, tau) for b in betas]
        if beta is not None:
            tuned[tau] = with_slowmo("localsgd", lr, beta, tau)
    return wanted, tuned


# ------------------------------------------------------------------------------------------------ statistics
def paired(with_: list[float], without: list[float]) -> tuple[float, float, float, float]:
    """Mean of the seed-by-seed differences, its 95 % t interval and the paired t-test's two-sided p-value."""
    diff = np.asarray(with_) - np.asarray(without)
    half = stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(len(diff))
    p = float(stats.ttest_rel(with_, without).pvalue)
    return float(diff.mean()), float(diff.mean() - half), float(diff.mean() + half), p


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979): the i-th smallest of m is multiplied by m - i + 1 (i from 1),
    made non-decreasing in that order and capped at 1; rejecting where the adjusted p <= alpha controls the
    family-wise error rate at alpha."""
    order = np.argsort(pvalues, kind="stable")
    adjusted, running = [0.0] * len(pvalues), 0.0
    for i, j in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - i) * pvalues[j]))
        adjusted[j] = running
    return adjusted


# ------------------------------------------------------------------------------------------------ tables
def name(setting: Setting) -> str:
    return LABELS[setting[0]] + (" + SlowMo" if setting[1] else "")


def mean_std(values: list[float], digits: int = 2) -> str:
    return f"{np.nanmean(values):.{digits}f} ± {np.nanstd(values):.{digits}f}"


def loss_and_accuracy(rs: list[dict]) -> str:
    """Two table cells: best train loss and test accuracy at the best validation point (mean ± std)."""
    return f"{mean_std([value(r, 'best_train_loss') for r in rs], 4)} | {mean_std(accs(rs))}"


def accs(rs: list[dict]) -> list[float]:
    return [value(r, "test_acc_at_best_val") for r in rs]


def diverged(rs: list[dict]) -> str:
    return f"{sum(r['status'] == 'diverged' for r in rs)}/{len(rs)}"


def tuning_table(rows: list[dict], tuned: dict) -> str:
    """Every setting the tuning scored, by cell, with the chosen one in bold and where it sits in the grid."""
    lines = ["| cell | searched | score: best val acc, mean of the tuning seeds (%) | chosen | in the grid |"]
    lines.append("|---|---|---|---|---|")
    for a in ALGORITHMS:
        for s in (False, True):
            if (a, s) not in tuned:
                continue
            grid, i = (BETAS, 3) if s else (LRS, 2)
            done = sorted(x for x in grid if score(rows, (*tuned[(a, s)][:i], x, *tuned[(a, s)][i + 1 :])) is not None)
            scores = [score(rows, (*tuned[(a, s)][:i], x, *tuned[(a, s)][i + 1 :])) for x in done]
            chosen = tuned[(a, s)][i]
            where = "interior" if done[0] < chosen < done[-1] else "end of the searched grid"
            where = "end of the grid" if chosen in (grid[0], grid[-1]) else where
            cells = ", ".join(
                f"**{x}: {v:.2f}**" if x == chosen else f"{x}: {v:.2f}" for x, v in zip(done, scores, strict=True)
            )
            what = f"beta (lr {tuned[(a, s)][2]})" if s else "lr"
            lines.append(f"| {name(tuned[(a, s)])} | {what} | {cells} | {chosen} | {where} |")
    return "\n".join(lines) + "\n"


def main_tables(rows: list[dict], tuned: dict) -> tuple[str, str]:
    """Table 1 (every cell at its tuned setting over the evaluation seeds) and the paired differences with Holm."""
    final = {c: runs_of(rows, tuned[c], EVAL_SEEDS) for c in tuned}
    lines = [
        "| cell | lr | beta | seeds | best train loss | test acc at best val (%) | best val acc (%) | diverged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, rs in final.items():
        lines.append(
            f"| {name(tuned[c])} | {tuned[c][2]} | {tuned[c][3] if c[1] else '-'} | {len(rs)} | "
            f"{loss_and_accuracy(rs)} | {mean_std([value(r, 'best_val_acc') for r in rs])} | {diverged(rs)} |"
        )
    table = "\n".join(lines) + "\n"
    rows_ = ["| comparison (test acc, points) | seeds | mean difference | 95 % t interval | p (paired t) | p (Holm) | "
             "best train loss, ratio of means |", "|---|---|---|---|---|---|---|"]  # fmt: skip

    def line(x: tuple[str, bool], y: tuple[str, bool], label: str, adjusted: str) -> str:
        mean, low, high, p = paired(accs(final[x]), accs(final[y]))
        ratio = np.nanmean([value(r, "best_train_loss") for r in final[x]]) / np.nanmean(
            [value(r, "best_train_loss") for r in final[y]]
        )
        interval = f"[{low:+.2f}, {high:+.2f}]"
        return f"| {label} | {len(final[x])} | {mean:+.2f} | {interval} | {p:.4f} | {adjusted} | {ratio:.2f} |"

    def complete(x: tuple[str, bool], y: tuple[str, bool]) -> bool:
        return x in final and y in final and len(final[x]) == len(final[y]) == len(EVAL_SEEDS)

    both = [a for a in ALGORITHMS if complete((a, True), (a, False))]
    family = holm([paired(accs(final[(a, True)]), accs(final[(a, False)]))[3] for a in both])
    for a, adjusted in zip(both, family, strict=True):
        rows_.append(line((a, True), (a, False), f"{LABELS[a]} + SlowMo − {LABELS[a]}", f"{adjusted:.4f}"))
    for a in ALGORITHMS[1:]:  # the regime: do the communication-efficient bases lose accuracy to AR-SGD?
        if complete((a, False), ("allreduce", False)):
            rows_.append(
                line((a, False), ("allreduce", False), f"{LABELS[a]} − AR-SGD (regime; not in the family)", "-")
            )
    return table, "\n".join(rows_) + "\n"


def ablation_table(rows: list[dict], tuned: dict) -> tuple[str, dict]:
    """The beta, tau and pseudo-gradient ablations, from the ledger's runs; and the series of the figures."""
    ab = ["| ablation | setting | seeds | best train loss | test acc at best val (%) |", "|---|---|---|---|---|"]
    series: dict[str, dict] = {"beta": {}, "tau": {}}
    for a in ALGORITHMS:
        if (a, True) not in tuned:
            continue
        t = tuned[(a, True)]
        betas = [b for b in BETAS if score(rows, with_slowmo(a, t[2], b)) is not None]
        groups = [runs_of(rows, with_slowmo(a, t[2], b), TUNE_SEEDS) for b in betas]
        series["beta"][f"{LABELS[a]} + SlowMo"] = (betas, groups)
        for b, rs in zip(betas, groups, strict=True):
            ab.append(f"| beta, {name(t)} (lr {t[2]}; tuning seeds) | {b} | {len(rs)} | {loss_and_accuracy(rs)} |")
    if ("localsgd", True) in tuned:
        lr = tuned[("localsgd", False)][2]
        _, by_tau = tau_round(rows, lr)
        for s in (False, True):
            xs, groups = [], []
            for tau in TAUS:
                setting = by_tau.get(tau) if s else ("localsgd", False, lr, None, tau, "scaled")
                rs = runs_of(rows, setting, ABLATION_SEEDS) if setting else []
                if rs:
                    xs.append(tau), groups.append(rs)
                    beta = f", beta {setting[3]} tuned" if s else ""
                    ab.append(f"| tau, {name(setting)} (H = tau{beta}) | {tau} | {len(rs)} | {loss_and_accuracy(rs)} |")
            series["tau"]["Local SGD" + (" + SlowMo" if s else "")] = (xs, groups)
    for a in ALGORITHMS:
        if (a, True) not in tuned:
            continue
        t = tuned[(a, True)]
        raw = runs_of(rows, (*t[:5], "raw"), ABLATION_SEEDS)
        own = runs_of(rows, t, [int(r["seed"]) for r in raw])
        if len(raw) > 1 and len(own) == len(raw):
            mean, low, high, p = paired(accs(raw), accs(own))
            ab.append(f"| raw Δ instead of Δ/γ, {name(t)} (test acc paired: {mean:+.2f} [{low:+.2f}, {high:+.2f}], "
                      f"p = {p:.3f}) | raw | {len(raw)} | {loss_and_accuracy(raw)} |")  # fmt: skip
    return "\n".join(ab) + "\n", series


def ablation_figure(series: dict[str, tuple[list[float], list[list[dict]]]], xlabel: str, path: Path) -> None:
    """Best train loss and test accuracy (mean ± std over seeds) against the ablated setting, one line per cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, (xs, groups) in series.items():
        for ax, key in zip(axes, ("best_train_loss", "test_acc_at_best_val"), strict=True):
            values = [[value(r, key) for r in g] for g in groups]
            means, stds = [np.nanmean(v) for v in values], [np.nanstd(v) for v in values]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
    axes[0].set(yscale="log", xlabel=xlabel, ylabel="best train loss")
    axes[1].set(xlabel=xlabel, ylabel="test accuracy at best val (%)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"MNIST-1D, 16 simulated ranks: {xlabel} ablation")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_tables(rows: list[dict], out: Path) -> dict:
    """Every table and figure of ``out`` from the ledger's rows alone; returns the tuned settings."""
    _, tuned = tuning_round(rows)
    (out / "tuning.md").write_text(tuning_table(rows, tuned))
    table, paired_md = main_tables(rows, tuned)
    (out / "table.md").write_text(table)
    (out / "paired.md").write_text(paired_md)
    ablations, series = ablation_table(rows, tuned)
    (out / "ablations.md").write_text(ablations)
    for key, path in (("beta", out / "beta.png"), ("tau", out / "tau.png")):
        if any(xs for xs, _ in series[key].values()):
            ablation_figure(series[key], key, path)
    return tuned


# ------------------------------------------------------------------------------------------------ the protocol
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    parser.add_argument("--runs", type=Path, default=Path("runs/generalization"))
    parser.add_argument("--out", type=Path, default=Path("results/generalization"))
    parser.add_argument("--no-ablations", action="store_true", help="the tuning and Table 1 only")
    parser.add_argument("--report", action="store_true", help="recompute the tables from runs.csv; run nothing")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    ledger = Ledger(args.out / "runs.csv", args.runs, args.jobs)
    before = len(ledger.rows)
    if not args.report:
        while True:  # 1-2. each cell's search a round at a time, a tuned cell's evaluation seeds beside it (one pool)
            wanted, tuned = tuning_round(ledger.rows)
            jobs = [(s, seed, "tune") for s in wanted for seed in TUNE_SEEDS]
            jobs += [(s, seed, "evaluate") for s in tuned.values() for seed in EVAL_SEEDS]
            if not any(job[:2] not in ledger.index for job in jobs):
                break
            ledger.run(jobs)
        if not args.no_ablations:  # 4. beta tuned per tau, then the tau and pseudo-gradient ablations
            lr = tuned[("localsgd", False)][2]
            while wanted := tau_round(ledger.rows, lr)[0]:
                ledger.run((s, seed, "tune") for s in wanted for seed in TUNE_SEEDS)
            settings = [("localsgd", False, lr, None, tau, "scaled") for tau in TAUS]
            settings += [*tau_round(ledger.rows, lr)[1].values(), *((*tuned[(a, True)][:5], "raw") for a in ALGORITHMS)]
            ledger.run((s, seed, "evaluate") for s in settings for seed in ABLATION_SEEDS)
    tuned = write_tables(ledger.rows, args.out)  # 3. the tables, from the ledger alone
    finished = [
        report.load_run(run_dir(args.runs, overrides(tuned[c], seed)))
        for c in tuned
        for seed in EVAL_SEEDS
        if (run_dir(args.runs, overrides(tuned[c], seed)) / "summary.json").is_file()
    ]
    if finished:
        title = f"MNIST-1D, 16 simulated ranks, tuned settings, {len(EVAL_SEEDS)} evaluation seeds (mean ± std)"
        report.figure(finished, args.out / "curves.png", "epoch", title)
    wall = time.time() - start
    run_s = [float(r["run_s"]) for r in ledger.rows if r["run_s"]]
    record(
        args.out,
        __file__,
        argv,
        preset=f"configs/experiment/{PRESET}.yaml",
        runs={p: sum(r["purpose"] == p for r in ledger.rows) for p in ("tune", "evaluate")},
        tune_seeds=list(TUNE_SEEDS),
        eval_seeds=list(EVAL_SEEDS),
        tuned={f"{a}{'+slowmo' if s else ''}": {"lr": t[2], "beta": t[3]} for (a, s), t in tuned.items()},
        runs_at_a_time=args.jobs,
        runs_this_sitting=len(ledger.rows) - before,
        wall_time_this_sitting_s=round(wall),
        run_time_s={"sum": round(sum(run_s)), "mean": round(float(np.mean(run_s)), 1) if run_s else None},
    )
    print((args.out / "table.md").read_text(), (args.out / "paired.md").read_text(), sep="\n")
    print(f"done: {len(ledger.rows) - before} new runs ({len(ledger.rows)} in the ledger) in {wall:.0f} s")


if __name__ == "__main__":
    main()
