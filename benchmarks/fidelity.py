"""Fidelity: does SlowMo help, and when? Table 1's three blocks as the paper ran them, with the knobs that decide the
sign.

Each block is an experiment preset with its sweep (its bases and evaluation seeds): ``fidelity_mnist1d`` (the CIFAR-10
block's protocol on MNIST-1D's 1D CNN, the headline), ``fidelity_resnet1d`` (the CIFAR-10 block's shape: a ResNet with
BatchNorm and weight decay, warm-up then three decays), ``fidelity_translation`` (the WMT'16 block's shape: an
encoder-decoder Transformer with Adam, buffers kept, on a generated language pair, scored by BLEU with beam search and
by validation NLL) and ``fidelity_regime`` (MNIST-1D with five times the data and 64 signals per rank). The protocol,
the same in every block:

1. **Tuning, on the validation split of the tuning seeds** ``TUNE_SEEDS`` (never evaluation seeds). A setting's score
   is the block's first metric (the paper's: best validation accuracy or BLEU), averaged over the tuning seeds; a run
   that diverged before any evaluation scores 0. Each base's lr is searched on a powers-of-two grid from three starting
   points, one neighbour at a time, until the best has both neighbours scored and worse; each SlowMo cell's beta the
   same way on 0, 0.1, ..., 0.9 at its base's tuned lr (the paper's protocol, the headline). No gradient clipping.
2. **Evaluation**: every tuned cell on every evaluation seed of the preset's sweep (the same seeds in every cell).
   Both metrics of the paper's table: the best validation metric (the paper's) and the test metric at the
   best-validation evaluation (held-out test split, never looked at by a choice); the Transformer block adds the best
   validation NLL. Diverged runs are counted, never dropped.
3. **Significance**: each SlowMo - base difference paired by seed, its 95 % t interval, the paired t-test's p-value,
   Holm's correction across the bases (per metric), and the smallest difference the seeds can detect (two-sided
   alpha = 0.05, power 0.8, from the observed spread of the differences); the regime, each base - AR-SGD.
4. **The decomposition** (``fidelity_mnist1d``): base; the exact average alone (SlowMo with beta = 0 and the base's
   buffers kept); the buffer reset alone (beta = 0, buffers zeroed, so with the exact average); SlowMo (beta tuned,
   buffers zeroed, the paper's); SlowMo with the buffers kept (beta tuned for it). With alpha = 1 and beta = 0 the
   outer step is x_{t+1,0} = x_{t,tau}, so each step adds one thing.
5. **A second protocol** (``fidelity_mnist1d``): the SlowMo cells' lr searched jointly with beta (the base's lr x 1/2,
   x 1 and x 2, beta searched at each), because a reader will ask.

Every run goes through its block's ledger ``runs_<block>.csv`` (purpose tune or evaluate, overrides, figures, the
commit, the CPU model and torch's CPU capability), appended as runs finish; a run already in it is not run again, so
the protocol spans sittings, and every table is computed from the ledgers alone (``--report``). Run it from a git
worktree pinned at one commit (it refuses a dirty tree), so that work elsewhere never changes the code under a sweep;
``--verify N`` reruns N recorded runs and says whether this commit reproduces their numbers bit for bit (how a sweep
moves to a newer commit; rows of one CPU kind only: float rounding differs between kinds). ``--rerun-here BASE ...``
reruns the evaluation of SlowMo and those bases, at the ledger's tuned settings, on this machine's kind of CPU into
``machines/<capability>/``, and ``machines_<block>.md`` compares the paired differences with the ledger's. One run:
``python experiments/<task>/train.py <its overrides>`` (the ledger's column).

    python benchmarks/fidelity.py [--blocks mnist1d ...]   # the protocol, resumable
    python benchmarks/fidelity.py --report                  # the tables and the answer page, from the ledgers
    python benchmarks/fidelity.py --blocks mnist1d --rerun-here localsgd sgp   # the same on another kind of CPU
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from scipy import stats

from slowmo import report
from slowmo.cells import run_cells
from slowmo.report import mean_std
from slowmo.train.config import compose, sweep

from common import read
from readme import record

HERE = Path(__file__).resolve().parent
TUNE_SEEDS = (1000, 1001)
BETAS = tuple(round(0.1 * i, 1) for i in range(10))  # 0, 0.1, ..., 0.9
START_BETAS = (0.0, 0.3, 0.6, 0.9)
SGD_LRS = (0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2)  # powers of two
ADAM_LRS = (1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3)
POWER, ALPHA = 0.8, 0.05  # of the smallest detectable difference


class Metric(NamedTuple):
    key: str  # report.numbers' key
    label: str
    higher: bool = True  # False: lower is better (a loss)


ACCURACY = (
    Metric("best_val_acc", "best val acc (%)"),
    Metric("test_acc_at_best_val", "test acc at best val (%)"),
)


@dataclass(frozen=True)
class Block:
    """One of Table 1's blocks: its preset (its sweep gives the bases and the evaluation seeds), its metrics (the first
    is the paper's and the tuning score), its lr grid, and which extra studies it runs."""

    preset: str  # fidelity_<name>
    title: str
    paper: str  # the paper's block this one stands for
    metrics: tuple[Metric, ...]
    lrs: tuple[float, ...]
    start_lrs: tuple[float, ...]
    decomposition: bool = False
    joint: bool = False

    @property
    def name(self) -> str:
        return self.preset.removeprefix("fidelity_")

    def __post_init__(self) -> None:
        if self.decomposition and self.buffers != "reset":
            raise ValueError(f"block {self.name}: the decomposition needs a preset that zeroes the base's buffers")

    @cached_property
    def config(self) -> dict:
        return compose([f"+experiment={self.preset}"])

    @cached_property
    def axes(self) -> dict[str, list[str]]:
        """The preset's sweep, by key: its algorithms and seeds."""
        values: dict[str, list[str]] = {}
        for cell in sweep(self.preset):
            for override in cell:
                key, value = override.split("=", 1)
                values.setdefault(key, [])
                if value not in values[key]:
                    values[key].append(value)
        return values

    @cached_property
    def bases(self) -> tuple[str, ...]:
        return tuple(self.axes["algorithm"])

    @cached_property
    def eval_seeds(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.axes["seed"])

    @cached_property
    def buffers(self) -> str:
        """The paper's policy for the base optimizer's buffers at an outer step in this block (the preset's)."""
        return self.config["slowmo"]["base_buffers"]

    def label(self, algorithm: str) -> str:
        return report.base_label(algorithm, self.config["optimizer"]["name"])


BLOCKS = {
    b.name: b
    for b in (
        Block(
            "fidelity_mnist1d",
            "MNIST-1D, 1D CNN, SGD + Nesterov, buffers zeroed",
            "CIFAR-10",
            ACCURACY,
            SGD_LRS,
            (0.1, 0.2, 0.4),
            decomposition=True,
            joint=True,
        ),
        Block(
            "fidelity_resnet1d",
            "MNIST-1D, 1D ResNet with BatchNorm, weight decay, three decays",
            "CIFAR-10",
            ACCURACY,
            SGD_LRS,
            (0.1, 0.2, 0.4),
        ),
        Block(
            "fidelity_translation",
            "generated En-De, Transformer, Adam, buffers kept",
            "WMT'16",
            (
                Metric("best_val_bleu", "best val BLEU"),
                Metric("test_bleu_at_best_val", "test BLEU at best val"),
                Metric("best_val_loss", "best val NLL", higher=False),
            ),
            ADAM_LRS,
            (5e-4, 1e-3, 2e-3),
        ),
        Block(
            "fidelity_regime",
            "MNIST-1D x 5 data, 64 per rank, 1D CNN",
            "CIFAR-10",
            ACCURACY,
            SGD_LRS,
            (0.1, 0.2, 0.4),
        ),
    )
}
PAPER = {  # the paper's Table 1 (configs/benchmark/fidelity.yaml): block -> base -> (base, with SlowMo)
    block: {base: tuple(values) for base, values in rows.items()} for block, rows in read("fidelity")["paper"].items()
}


class Setting(NamedTuple):
    """One cell's setting: with SlowMo, beta and the base's buffers at an outer step (None: the preset's)."""

    algorithm: str
    slowmo: bool
    lr: float
    beta: float | None = None
    buffers: str | None = None


# the cells of a block, per base: what each runs (the decomposition and the joint protocol in the blocks that have them)
KINDS = {
    "base": "base",
    "slowmo": "+ SlowMo (beta tuned at the base's lr: the paper's protocol)",
    "average": "+ exact average alone (beta = 0, buffers kept)",
    "reset": "+ buffer reset alone (beta = 0, buffers zeroed, with the exact average)",
    "kept": "+ SlowMo with buffers kept (beta tuned)",
    "joint": "+ SlowMo, lr and beta tuned jointly",
}


def overrides(block: Block, s: Setting, seed: int) -> list[str]:
    out = [f"algorithm={s.algorithm}", f"slowmo={'on' if s.slowmo else 'off'}", f"optimizer.lr={s.lr:g}"]
    out += [f"slowmo.update.beta={s.beta:g}"] if s.slowmo else []
    out += [f"slowmo.base_buffers={s.buffers}"] if s.buffers not in (None, block.buffers) else []
    return [*out, f"seed={seed}"]


def setting_of(row: dict) -> Setting:
    beta = float(row["beta"]) if row["beta"] else None
    return Setting(row["algorithm"], row["slowmo"] == "True", float(row["lr"]), beta, row["base_buffers"] or None)


# ------------------------------------------------------------------------------------------------ the ledger
COLUMNS = ("purpose", "algorithm", "slowmo", "lr", "beta", "base_buffers", "seed", "overrides")
MACHINE = ("commit", "cpu", "cpu_capability", "torch", "run_s")


def machine() -> dict[str, str]:
    """What produced a row: the commit of this checkout, the CPU model, torch's CPU capability and version."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        if Path("/proc/cpuinfo").is_file()
        else ""
    )
    return {
        "commit": commit.stdout.strip() or "unknown",
        "cpu": cpu or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
    }


class Ledger:
    """``runs_<block>.csv``: every finished run of a block; :meth:`run` runs what is not in it yet and appends each
    batch as it finishes."""

    def __init__(self, block: Block, out: Path, runs: Path, jobs: int) -> None:
        self.block, self.path, self.runs, self.jobs = block, out / f"runs_{block.name}.csv", runs / block.name, jobs
        self.rows = list(csv.DictReader(self.path.open())) if self.path.is_file() else []
        self.index = {(setting_of(r), int(r["seed"])): r for r in self.rows}

    @property
    def fields(self) -> tuple[str, ...]:
        return (
            *COLUMNS,
            "status",
            "steps",
            "best_train_loss",
            *(m.key for m in self.block.metrics),
            "epoch_of_best_val",
            *MACHINE,
        )

    def missing(self, jobs: Iterable[tuple[Setting, int, str]]) -> list[tuple[Setting, int, str]]:
        return [job for job in dict.fromkeys(jobs) if job[:2] not in self.index]

    def run(self, jobs: Iterable[tuple[Setting, int, str]]) -> None:
        """Run every (setting, seed, purpose) not in the ledger yet, in one pool; each appended as it finishes (in
        order), so that a sweep stopped mid-round keeps what it finished."""
        todo = self.missing(jobs)
        if not todo:
            return
        cells = [overrides(self.block, s, seed) for s, seed, _ in todo]
        here = machine()

        def record(i: int, directory: Path) -> None:
            (s, seed, purpose), cell = todo[i], cells[i]
            numbers = report.load_run(directory)["numbers"]
            summary = directory / "summary.json"
            row = {
                "purpose": purpose,
                "algorithm": s.algorithm,
                "slowmo": s.slowmo,
                "lr": s.lr,
                "beta": "" if s.beta is None else s.beta,
                "base_buffers": s.buffers or "",
                "seed": seed,
                "overrides": " ".join([f"+experiment={self.block.preset}", *cell]),
            }
            row.update({key: numbers[key] for key in self.fields[len(COLUMNS) : -len(MACHINE)]})
            row.update(here, run_s=round(json.loads(summary.read_text())["wall_time"], 1) if summary.is_file() else "")
            new = {key: str(value) for key, value in row.items()}
            fresh = not self.path.is_file()
            with self.path.open("a", newline="") as f:
                writer = csv.DictWriter(f, self.fields)
                if fresh:
                    writer.writeheader()
                writer.writerow(new)
            self.rows.append(new)
            self.index[(setting_of(new), int(new["seed"]))] = new

        run_cells(self.block.preset, cells, self.runs, self.jobs, done=record)


# ------------------------------------------------------------------------------------------------ reading a ledger
def value(row: dict, key: str) -> float:
    return float(row[key]) if row[key] not in ("", "nan") else float("nan")


class Reader:
    """A block's ledger rows, read: each setting's runs over some seeds, its tuning score, the grid searches."""

    def __init__(self, block: Block, rows: list[dict]) -> None:
        self.block, self.index = block, {(setting_of(r), int(r["seed"])): r for r in rows}
        self.metric = block.metrics[0]

    def runs(self, setting: Setting, seeds: Iterable[int]) -> list[dict]:
        return [self.index[(setting, seed)] for seed in seeds if (setting, seed) in self.index]

    def score(self, setting: Setting) -> float | None:
        """The tuning score: the paper's metric, mean over the tuning seeds (a run with no evaluation: 0, or +inf
        for a loss, so the worst); None until every tuning seed ran."""
        rs = self.runs(setting, TUNE_SEEDS)
        if len(rs) < len(TUNE_SEEDS):
            return None
        worst = 0.0 if self.metric.higher else float("inf")
        mean = float(np.mean([np.nan_to_num(value(r, self.metric.key), nan=worst) for r in rs]))
        return mean if self.metric.higher else -mean

    def tuning(self) -> tuple[list[Setting], dict[tuple[str, str], Setting], dict]:
        """What the tuning needs scored next (on every tuning seed), the cells tuned so far by (base, kind), and the
        searches (cell -> (parameter, grid, the setting at a grid point))."""
        b, wanted, tuned, searches = self.block, [], {}, {}

        def tune(cell: tuple[str, str], parameter: str, grid: tuple, start: tuple, at: Callable[[float], Setting]):
            """Search ``parameter``; a cell of KINDS, once tuned, is evaluated (a joint protocol's lr is not)."""
            searches[cell] = (parameter, grid, at)
            points, best = search(grid, start, lambda x: self.score(at(x)))
            wanted.extend(at(x) for x in points)
            if best is not None and cell[1] in KINDS:
                tuned[cell] = at(best)
            return best

        for a in b.bases:
            lr = tune((a, "base"), "lr", b.lrs, b.start_lrs, lambda x, a=a: Setting(a, False, x))
            if lr is None:
                continue
            slowmo = lambda beta, lr=lr, a=a, buffers=None: Setting(a, True, lr, beta, buffers)  # noqa: E731
            tune((a, "slowmo"), "beta", BETAS, START_BETAS, slowmo)
            if b.decomposition:  # (a block whose buffers are zeroed: Block checks it)
                tuned[(a, "average")] = slowmo(0.0, buffers="keep")
                tuned[(a, "reset")] = slowmo(0.0)
                tune((a, "kept"), "beta", BETAS, START_BETAS, lambda beta, slowmo=slowmo: slowmo(beta, buffers="keep"))
            if b.joint:
                i, best = b.lrs.index(lr), []
                for j in (i - 1, i, i + 1):
                    if 0 <= j < len(b.lrs):
                        at = lambda beta, x=b.lrs[j], a=a: Setting(a, True, x, beta)  # noqa: E731
                        beta = tune((a, f"joint lr {b.lrs[j]:g}"), "beta", BETAS, START_BETAS, at)
                        best.append(None if beta is None else at(beta))
                if None not in best:
                    tuned[(a, "joint")] = max(best, key=lambda s: (self.score(s), -s.lr, -s.beta))
        return wanted, tuned, searches


def search(grid: tuple, start: Iterable, scored: Callable[[float], float | None]) -> tuple[list, float | None]:
    """One round of a grid search: the points still to score (``start`` first, then the best point's unscored grid
    neighbours), and the best point once none is left (None until then). A tie goes to the smaller value."""
    wanted = [p for p in start if scored(p) is None]
    if wanted:
        return wanted, None
    done = [p for p in grid if scored(p) is not None]
    best = max(done, key=lambda p: (scored(p), -grid.index(p)))
    i = grid.index(best)
    wanted = [grid[j] for j in (i - 1, i + 1) if 0 <= j < len(grid) and scored(grid[j]) is None]
    return wanted, (None if wanted else best)


# ------------------------------------------------------------------------------------------------ statistics
def paired(with_: list[float], without: list[float]) -> tuple[float, float, float, float, float]:
    """Mean of the seed-by-seed differences, its 95 % t interval, the paired t-test's two-sided p-value and the
    smallest difference these seeds detect with power ``POWER`` at two-sided ``ALPHA``:
    (t_{1-alpha/2} + t_{power}) s_d / sqrt(n), n - 1 degrees of freedom, s_d the sample std of the differences."""
    diff = np.asarray(with_) - np.asarray(without)
    n, sd = len(diff), diff.std(ddof=1)
    half = stats.t.ppf(1 - ALPHA / 2, n - 1) * sd / np.sqrt(n)
    detectable = (stats.t.ppf(1 - ALPHA / 2, n - 1) + stats.t.ppf(POWER, n - 1)) * sd / np.sqrt(n)
    p = float(stats.ttest_rel(with_, without).pvalue)
    return float(diff.mean()), float(diff.mean() - half), float(diff.mean() + half), p, float(detectable)


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
class Tables:
    """A block's tables, from its ledger rows alone."""

    def __init__(self, block: Block, rows: list[dict]) -> None:
        self.block, self.read = block, Reader(block, rows)
        self.wanted, self.tuned, self.searches = self.read.tuning()
        self.final = {c: self.read.runs(s, block.eval_seeds) for c, s in self.tuned.items()}

    def name(self, cell: tuple[str, str]) -> str:
        a, kind = cell
        return self.block.label(a) + ("" if kind == "base" else " " + KINDS[kind].split(" (")[0])

    def complete(self, *cells: tuple[str, str]) -> bool:
        return all(len(self.final.get(c, [])) == len(self.block.eval_seeds) for c in cells)

    def values(self, cell: tuple[str, str], key: str) -> list[float]:
        return [value(r, key) for r in self.final[cell]]

    def tuning_table(self) -> str:
        lines = [
            f"| cell | searched | score: {self.read.metric.label}, mean of the tuning seeds | chosen | where |",
            "|---|---|---|---|---|",
        ]
        for cell, (parameter, grid, at) in self.searches.items():
            done = [x for x in grid if self.read.score(at(x)) is not None]
            if not done:
                continue
            sign = 1 if self.read.metric.higher else -1
            scores = {x: sign * self.read.score(at(x)) for x in done}
            chosen = getattr(self.tuned[cell], parameter) if cell in self.tuned else None
            where = "-" if chosen is None else ("end of the grid" if chosen in (grid[0], grid[-1]) else "interior")
            cells = ", ".join(f"**{x:g}: {v:.2f}**" if x == chosen else f"{x:g}: {v:.2f}" for x, v in scores.items())
            what = parameter if parameter == "lr" else f"beta (lr {at(0.0).lr:g})"
            label = self.name(cell) if cell[1] in KINDS else f"{self.block.label(cell[0])} + SlowMo, {cell[1]}"
            lines.append(f"| {label} | {what} | {cells} | {'-' if chosen is None else f'{chosen:g}'} | {where} |")
        return "\n".join(lines) + "\n"

    def cell_table(self) -> str:
        ms = self.block.metrics
        lines = [
            "| cell | lr | beta | buffers | seeds | best train loss | "
            + " | ".join(m.label for m in ms)
            + " | diverged |",
            "|---" * (7 + len(ms)) + "|",
        ]
        for cell, rs in self.final.items():
            s = self.tuned[cell]
            buffers = (s.buffers or self.block.buffers) if s.slowmo else "-"
            figures = " | ".join(mean_std(self.values(cell, m.key)) for m in ms)
            lines.append(
                f"| {self.name(cell)} | {s.lr:g} | {'-' if s.beta is None else f'{s.beta:g}'} | {buffers} | {len(rs)} |"
                f" {mean_std(self.values(cell, 'best_train_loss'), 4)} | {figures} |"
                f" {sum(r['status'] == 'diverged' for r in rs)}/{len(rs)} |"
            )
        return "mean ± sample std (ddof 1) over the evaluation seeds.\n\n" + "\n".join(lines) + "\n"

    def differences(self, pairs: list[tuple[tuple, tuple, str]], family: bool) -> list[dict]:
        """Paired differences x - y on every metric (Holm across ``pairs`` per metric when ``family``)."""
        out = []
        done = [(x, y, label) for x, y, label in pairs if self.complete(x, y)]
        for m in self.block.metrics:
            results = [paired(self.values(x, m.key), self.values(y, m.key)) for x, y, _ in done]
            adjusted = holm([r[3] for r in results]) if family and results else [None] * len(results)
            for (x, y, label), r, p_holm in zip(done, results, adjusted, strict=True):
                out.append(
                    {
                        "comparison": label,
                        "x": x,
                        "y": y,
                        "metric": m,
                        "mean": r[0],
                        "low": r[1],
                        "high": r[2],
                        "p": r[3],
                        "holm": p_holm,
                        "detectable": r[4],
                    }
                )
        return out

    def slowmo_pairs(self, kind: str = "slowmo") -> list[tuple]:
        return [((a, kind), (a, "base"), f"{self.name((a, kind))} − {self.block.label(a)}") for a in self.block.bases]

    def regime_pairs(self) -> list[tuple]:
        first = self.block.bases[0]
        return [
            ((a, "base"), (first, "base"), f"{self.block.label(a)} − {self.block.label(first)}")
            for a in self.block.bases[1:]
        ]

    @staticmethod
    def difference_table(diffs: list[dict], note: str) -> str:
        lines = [
            "| comparison | metric | seeds | mean difference | 95 % t interval | p (paired t) | p (Holm) | "
            "detectable (power 0.8) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for d in diffs:
            holm_p = "-" if d["holm"] is None else f"{d['holm']:.4f}"
            lines.append(
                f"| {d['comparison']} | {d['metric'].label} | {d['n']} | {d['mean']:+.2f} | "
                f"[{d['low']:+.2f}, {d['high']:+.2f}] | {d['p']:.4f} | {holm_p} | {d['detectable']:.2f} |"
            )
        return note + "\n\n" + "\n".join(lines) + "\n"

    def paired_table(self) -> str:
        diffs = self.differences(self.slowmo_pairs(), family=True)
        regime = self.differences(self.regime_pairs(), family=False)
        for d in diffs + regime:
            d["n"] = len(self.final[d["x"]])
        text = self.difference_table(diffs, "SlowMo − base, paired by seed; Holm across the bases, per metric.")
        return text + "\n" + self.difference_table(regime, "The regime: each base − the first, paired by seed.")

    def decomposition_table(self) -> str:
        """Each step of the decomposition against the one before it, per base: what each adds."""
        steps = [
            ("average", "base", "the exact average"),
            ("reset", "average", "the buffer reset"),
            ("slowmo", "reset", "slow momentum (beta tuned)"),
            ("slowmo", "base", "all of SlowMo (the paper's)"),
            ("kept", "slowmo", "keeping the buffers instead"),
            ("kept", "base", "SlowMo with buffers kept"),
        ]
        pairs = [((a, x), (a, y), f"{self.block.label(a)}: {label}") for a in self.block.bases for x, y, label in steps]
        diffs = self.differences(pairs, family=False)
        for d in diffs:
            d["n"] = len(self.final[d["x"]])
        return self.difference_table(diffs, "Each step's paired difference (the second cell's runs subtracted).")

    def joint_table(self) -> str:
        pairs = [
            ((a, "joint"), (a, "slowmo"), f"{self.name((a, 'joint'))} − {self.name((a, 'slowmo'))}")
            for a in self.block.bases
        ] + self.slowmo_pairs("joint")
        diffs = self.differences(pairs[len(self.block.bases) :], family=True)
        diffs += self.differences(pairs[: len(self.block.bases)], family=False)
        for d in diffs:
            d["n"] = len(self.final[d["x"]])
        chosen = ", ".join(
            f"{self.block.label(a)}: lr {self.tuned[(a, 'joint')].lr:g}, beta {self.tuned[(a, 'joint')].beta:g}"
            for a in self.block.bases
            if (a, "joint") in self.tuned
        )
        return self.difference_table(diffs, f"The second protocol (lr x 1/2, 1, 2 with beta). Chosen: {chosen}.")


# ------------------------------------------------------------------------------------------------ the answer page
def answer(tables: dict[str, Tables]) -> str:
    """For each block and base: the paper's numbers, this project's on the paper's metric, and SlowMo − base on every
    metric (mean, interval, Holm's p), with what the decomposition says carries it."""
    lines = [
        "| block | base | paper: base → SlowMo | here: base → SlowMo (paper's metric) | SlowMo − base, each metric: "
        "mean [95 % interval] (Holm p) | carried by |",
        "|---|---|---|---|---|---|",
    ]
    for t in tables.values():
        b, diffs = t.block, t.differences(t.slowmo_pairs(), family=True)
        for a in b.bases:
            if not t.complete((a, "base"), (a, "slowmo")):
                continue
            base, slowmo = PAPER[b.paper].get(a, (None, None))
            paper = "-" if base is None else f"{base:.2f} → {'-' if slowmo is None else f'{slowmo:.2f}'}"
            m = b.metrics[0]
            here = f"{np.nanmean(t.values((a, 'base'), m.key)):.2f} → {np.nanmean(t.values((a, 'slowmo'), m.key)):.2f}"
            each = "; ".join(
                f"{d['metric'].label}: {d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] ({d['holm']:.3f})"
                for d in diffs
                if d["x"][0] == a
            )
            lines.append(f"| {b.title} | {b.label(a)} | {paper} | {here} | {each} | {carried_by(t, a)} |")
    return "\n".join(lines) + "\n"


def carried_by(t: Tables, a: str) -> str:
    """The decomposition's verdict on the paper's metric: the step whose paired difference is largest in size, with
    whether its interval excludes 0; '-' where the block has no decomposition."""
    steps = {
        "exact average": ("average", "base"),
        "buffer reset": ("reset", "average"),
        "slow momentum": ("slowmo", "reset"),
    }
    if not t.block.decomposition or not t.complete(*{(a, kind) for pair in steps.values() for kind in pair}):
        return "-"
    m = t.block.metrics[0]
    found = {name: paired(t.values((a, x), m.key), t.values((a, y), m.key)) for name, (x, y) in steps.items()}
    name, (mean, low, high, _, _) = max(found.items(), key=lambda item: abs(item[1][0]))
    significant = "interval excludes 0" if low > 0 or high < 0 else "interval includes 0"
    return f"{name} ({mean:+.2f}, {significant})"


# ------------------------------------------------------------------------------------------------ figures
def beta_figure(t: Tables, path: Path) -> None:
    """The tuning score against beta at each base's tuned lr (buffers zeroed and kept where both ran)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    sign = 1 if t.read.metric.higher else -1
    for (a, kind), (parameter, grid, at) in t.searches.items():
        if parameter != "beta" or kind not in ("slowmo", "kept"):
            continue
        xs = [x for x in grid if t.read.score(at(x)) is not None]
        ys = [sign * t.read.score(at(x)) for x in xs]
        style = "-o" if kind == "slowmo" else "--s"
        ax.plot(xs, ys, style, label=f"{t.name((a, kind))} (lr {at(0.0).lr:g})", markersize=4)
    ax.set(xlabel="beta", ylabel=f"{t.read.metric.label}, mean of {len(TUNE_SEEDS)} tuning seeds")
    ax.set_title(f"{t.block.title}:\nbeta at the base's tuned lr", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def decomposition_figure(t: Tables, path: Path) -> None:
    """Per base, each cell of the decomposition minus the base, paired by seed, on the paper's metric: the mean and
    its 95 % t interval (what the decomposition table says, drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [
        ("average", "the exact average alone"),
        ("reset", "the buffer reset alone (beta = 0)"),
        ("slowmo", "SlowMo, buffers reset (the paper's)"),
        ("kept", "SlowMo, buffers kept"),
    ]
    metric, bases = t.block.metrics[0], [a for a in t.block.bases if (a, "base") in t.final]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / len(kinds)
    for k, (kind, label) in enumerate(kinds):
        xs, means, errors = [], [], [[], []]
        for i, a in enumerate(bases):
            if not t.complete((a, kind), (a, "base")):
                continue
            mean, low, high, _, _ = paired(t.values((a, kind), metric.key), t.values((a, "base"), metric.key))
            xs.append(i + (k - (len(kinds) - 1) / 2) * width)
            means.append(mean)
            errors[0].append(mean - low)
            errors[1].append(high - mean)
        ax.bar(xs, means, width, yerr=errors, capsize=2, label=label)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(bases)), [t.block.label(a) for a in bases])
    ax.set(ylabel=f"{metric.label} minus the base's, same seed")
    ax.set_title(
        f"{t.block.title}\n{len(t.block.eval_seeds)} seeds: mean and 95 % t interval of the paired difference",
        fontsize=9,
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ the protocol
def write(tables: dict[str, Tables], out: Path) -> None:
    """Every table and figure of ``out`` from the ledgers' rows alone (and the reruns on other CPUs, under
    ``out/machines/``)."""
    for name, t in tables.items():
        again = {d.name: list(csv.DictReader(d.joinpath(f"runs_{name}.csv").open())) for d in machines(out, name)}
        if again:
            (out / f"machines_{name}.md").write_text(machine_table(t, again))
        parts = [f"## {t.block.title} (`+experiment={t.block.preset}`)", "", t.cell_table(), t.paired_table()]
        if t.block.decomposition:
            parts.append(t.decomposition_table())
        if t.block.joint:
            parts.append(t.joint_table())
        parts += ["Tuning:", "", t.tuning_table()]
        (out / f"{name}.md").write_text("\n".join(parts))
        if any(t.read.score(at(x)) is not None for p, grid, at in t.searches.values() if p == "beta" for x in grid):
            beta_figure(t, out / f"{name}_beta.png")  # (once a beta was scored)
        if t.block.decomposition:
            decomposition_figure(t, out / f"{name}_decomposition.png")
    (out / "answer.md").write_text(answer(tables))


# ------------------------------------------------------------------------------------------------ another CPU
MACHINES = "machines"  # out/machines/<capability>/runs_<block>.csv: a block's evaluation rerun on another kind of CPU


def machines(out: Path, name: str) -> list[Path]:
    return sorted(d for d in (out / MACHINES).glob("*") if (d / f"runs_{name}.csv").is_file())


def rerun_here(block: Block, out: Path, runs: Path, jobs: int, bases: list[str]) -> None:
    """The evaluation of SlowMo and its base on ``bases`` (the tuned settings of the ledger in ``out``: no tuning
    again), on every evaluation seed, on this machine, into ``out/machines/<torch's CPU capability>/``."""
    here = machine()["cpu_capability"].lower()
    t = Tables(block, Ledger(block, out, runs, jobs).rows)
    (out / MACHINES / here).mkdir(parents=True, exist_ok=True)
    ledger = Ledger(block, out / MACHINES / here, runs / MACHINES / here, jobs)
    cells = [(a, kind) for a in bases for kind in ("base", "slowmo")]
    ledger.run([(t.tuned[c], seed, "evaluate") for c in cells for seed in block.eval_seeds])


def machine_table(t: Tables, again: dict[str, list[dict]]) -> str:
    """SlowMo − base paired by seed on the ledger's machine and on each rerun's: means, 95 % intervals, and whether
    each mean falls inside the other's interval."""
    tune = [r for r in t.read.index.values() if r["purpose"] == "tune"]
    mine = {(d["comparison"], d["metric"].key): d for d in t.differences(t.slowmo_pairs(), family=False)}
    where = sorted({f"{r['cpu']} ({r['cpu_capability']})" for rs in t.final.values() for r in rs})
    lines = []
    for name, rows in again.items():
        other = Tables(t.block, tune + rows)
        theirs = other.differences(other.slowmo_pairs(), family=False)
        machine_of = sorted({f"{r['cpu']} ({r['cpu_capability']})" for r in rows})
        lines += [
            f"Evaluation rerun on {', '.join(machine_of)} (`{MACHINES}/{name}/`), against the ledger's "
            f"({', '.join(where)}); the same tuned settings and seeds.",
            "",
            "| comparison | metric | seeds | ledger's machine | rerun | difference of the means | each mean inside "
            "the other's interval |",
            "|---|---|---|---|---|---|---|",
        ]
        for d in theirs:
            m = mine[(d["comparison"], d["metric"].key)]
            inside = m["low"] <= d["mean"] <= m["high"] and d["low"] <= m["mean"] <= d["high"]
            lines.append(
                f"| {d['comparison']} | {d['metric'].label} | {len(other.final[d['x']])} | "
                f"{m['mean']:+.2f} [{m['low']:+.2f}, {m['high']:+.2f}] | {d['mean']:+.2f} [{d['low']:+.2f}, "
                f"{d['high']:+.2f}] | {d['mean'] - m['mean']:+.2f} | {'yes' if inside else 'no'} |"
            )
        lines.append("")
    return "\n".join(lines)


def jobs_of(t: Tables) -> list[tuple[Setting, int, str]]:
    jobs = [(s, seed, "tune") for s in t.wanted for seed in TUNE_SEEDS]
    return jobs + [(s, seed, "evaluate") for s in t.tuned.values() for seed in t.block.eval_seeds]


def verify(ledger: Ledger, n: int, runs: Path) -> list[str]:
    """Rerun ``n`` of the ledger's evaluation runs made on this CPU (spread over it) in fresh directories; a line each
    saying whether this commit gives their recorded numbers bit for bit."""
    here = machine()
    rows = [
        r
        for r in ledger.rows
        if r["purpose"] == "evaluate" and (r["cpu"], r["cpu_capability"]) == (here["cpu"], here["cpu_capability"])
    ]
    picked = rows[:: max(1, len(rows) // n)][:n]
    cells = [r["overrides"].split()[1:] for r in picked]
    dirs = run_cells(ledger.block.preset, cells, runs / "verify" / ledger.block.name, ledger.jobs, fresh=True)
    lines = []
    for r, d in zip(picked, dirs, strict=True):
        numbers = report.load_run(d)["numbers"]
        same = (
            all(str(numbers[m.key]) == r[m.key] for m in ledger.block.metrics)
            and str(numbers["best_train_loss"]) == r["best_train_loss"]
        )
        lines.append(
            f"{'same' if same else 'DIFFERENT'}: {r['overrides']} (recorded at {r['commit']}, now {here['commit']})"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", nargs="+", choices=list(BLOCKS), default=list(BLOCKS))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    parser.add_argument("--runs", type=Path, default=Path("runs/fidelity"))
    parser.add_argument("--out", type=Path, default=Path("results/fidelity"))
    parser.add_argument("--report", action="store_true", help="the tables from the ledgers; run nothing")
    parser.add_argument("--verify", type=int, metavar="N", help="rerun N recorded runs per block; run nothing else")
    parser.add_argument(
        "--rerun-here",
        nargs="+",
        metavar="BASE",
        help="rerun these bases' evaluation (base and SlowMo, the ledger's tuned settings) on this machine, into "
        "out/machines/<CPU capability>/; run nothing else",
    )
    args = parser.parse_args(argv)
    blocks = [BLOCKS[b] for b in args.blocks]
    ledgers = {b.name: Ledger(b, args.out, args.runs, args.jobs) for b in blocks}
    if not args.report:
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True, text=True
        ).stdout
        root = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=HERE, capture_output=True, text=True)
        own = args.out.resolve().relative_to(Path(root.stdout.strip()).resolve()).as_posix() + "/"
        if any(not line[3:].startswith(own) for line in status.splitlines()):  # (the ledgers it appends to aside)
            raise SystemExit(
                "fidelity: this checkout has uncommitted changes; run the sweep from a clean git worktree "
                "pinned at one commit (git worktree add ../fidelity HEAD), so every row's commit is its code"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    if args.verify:
        for ledger in ledgers.values():
            print("\n".join(verify(ledger, args.verify, args.runs)))
        return
    start, before = time.time(), sum(len(ledger.rows) for ledger in ledgers.values())
    for block in blocks if args.rerun_here else []:
        rerun_here(block, args.out, args.runs, args.jobs, args.rerun_here)
    while (
        not args.report and not args.rerun_here
    ):  # each block's searches a round at a time, tuned cells' evaluation seeds beside them
        todo = {name: ledger.missing(jobs_of(Tables(ledger.block, ledger.rows))) for name, ledger in ledgers.items()}
        if not any(todo.values()):
            break
        for name, jobs in todo.items():
            ledgers[name].run(jobs)
    # the tables cover every block with a ledger, whichever ran this time
    everything = {b.name: Ledger(b, args.out, args.runs, args.jobs) for b in BLOCKS.values()}
    tables = {name: Tables(ledger.block, ledger.rows) for name, ledger in everything.items() if ledger.rows}
    write(tables, args.out)
    rows = [r for ledger in everything.values() for r in ledger.rows]
    cpu_s = sum(float(r["run_s"]) for r in rows if r["run_s"])
    record(
        args.out,
        __file__,
        argv,
        blocks={
            name: {
                "preset": f"configs/experiment/{t.block.preset}.yaml",
                "runs": len(everything[name].rows),
                "eval_seeds": len(t.block.eval_seeds),
                "machines": sorted({f"{r['cpu']} ({r['cpu_capability']})" for r in everything[name].rows}),
                "commits": sorted({r["commit"] for r in everything[name].rows}),
            }
            for name, t in tables.items()
        },
        tune_seeds=list(TUNE_SEEDS),
        runs_at_a_time=args.jobs,
        run_time_h=round(cpu_s / 3600, 2),
        runs_this_sitting=len(rows) - before,
        wall_time_this_sitting_s=round(time.time() - start),
    )
    print((args.out / "answer.md").read_text())
    print(f"done: {len(rows) - before} new runs ({len(rows)} in the ledgers) in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
