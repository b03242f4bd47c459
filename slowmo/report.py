"""Tables and paper-style figures from run directories alone (``config.yaml``, ``metrics.jsonl``, ``summary.json``).

Runs that differ only in their seed are one line: the mean, with a +-std band (and mean +- std in tables)."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .algorithms import ALGORITHMS
from .outer.presets import PRESETS
from .train.optimizers import OPTIMIZERS


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """A run, read from its directory: ``config``, ``metrics``, ``summary`` (None for a run that stopped on a non-finite
    loss, whose ``diverged.json`` says where), its ``status`` and its :func:`numbers`. The one reader of the
    quickstart and the benchmarks."""
    run_dir = Path(run_dir)
    stopped = (run_dir / "diverged.json").is_file()
    for name in ("config.yaml", "metrics.jsonl", *(() if stopped else ("summary.json",))):
        if not (run_dir / name).is_file():
            raise ValueError(f"{run_dir} is not a finished run directory: {name} is missing")
    summary = None if stopped else json.loads((run_dir / "summary.json").read_text())
    run = {
        "dir": run_dir,
        "config": yaml.safe_load((run_dir / "config.yaml").read_text()),
        "metrics": [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line],
        "summary": summary,
        "status": summary["status"] if summary else "diverged",
    }
    run["numbers"] = numbers(run)
    return run


def numbers(run: dict[str, Any]) -> dict[str, Any]:
    """A run's figures, from its metrics (finished or not alike): the status, the steps, the best and final train
    loss, and, for the main metric m (``val_acc``, ``val_bleu``), its best value over the evaluations
    (``best_<m>``), the test metric at that evaluation (``test_<...>_at_best_val``, where the task has a test split)
    and its epoch, its final value (``final_<m>``: the finished run's, after the last exact average), the lowest
    validation loss (``best_val_loss``) and the MiB each rank sent."""
    records, summary = run["metrics"], run["summary"]
    evals = [r for r in records if any(k.startswith("val_") and k != "val_loss" for k in r)]
    metric = (
        summary["main_metric"]
        if summary
        else next((k for k in (evals or [{}])[0] if k.startswith("val_") and k != "val_loss"), "val_loss")
    )
    best = max(evals, key=lambda r: r[metric]) if evals else {}
    test = "test_" + metric.removeprefix("val_")
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    return {
        "status": run["status"],
        "steps": summary["steps"] if summary else (records[-1]["step"] if records else 0),
        "best_train_loss": min(losses, default=float("nan")),
        "final_train_loss": losses[-1] if losses else float("nan"),
        f"best_{metric}": best.get(metric, float("nan")),
        f"{test}_at_best_val": best.get(test, float("nan")),
        "epoch_of_best_val": best.get("epoch", float("nan")),
        f"final_{metric}": summary["final"][metric] if summary else float("nan"),
        "best_val_loss": min((r["val_loss"] for r in records if "val_loss" in r), default=float("nan")),
        "mib_sent_per_rank": summary["comm_bytes"] / 2**20 if summary else float("nan"),
    }


def base_label(algorithm: str, optimizer: str) -> str:
    """A base algorithm's label with the base optimizer's in place of "SGD" (AR-Adam, Local Adam)."""
    return ALGORITHMS[algorithm].label.replace("SGD", OPTIMIZERS[optimizer].label)


def label(run: dict[str, Any]) -> str:
    """The run's line in tables and figures: :func:`base_label` and the outer step's ("Local SGD + SlowMo")."""
    config = run["config"]
    name = base_label(config["algorithm"]["name"], config["optimizer"]["name"])
    return name + (f" + {PRESETS[config['slowmo']['preset']].label}" if config["slowmo"]["enabled"] else "")


def group(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list] = defaultdict(list)
    for run in runs:
        groups[label(run)].append(run)
    return dict(groups)


def _main_metric(run: dict[str, Any]) -> str:
    return run["summary"]["main_metric"]


def _last_train_loss(run: dict[str, Any]) -> float:
    return [m for m in run["metrics"] if "train_loss" in m][-1]["train_loss"]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per algorithm: final train loss, final and best validation metric, bytes per rank, wall time."""
    rows = []
    for name, members in group(runs).items():
        metric = _main_metric(members[0])
        loss = _mean_std([_last_train_loss(r) for r in members])
        final = _mean_std([r["summary"]["final"][metric] for r in members])
        best = _mean_std([r["summary"]["best"][metric] for r in members])
        rows.append(
            {
                "algorithm": name,
                "seeds": len(members),
                "steps": members[0]["summary"]["steps"],
                "train_loss": loss[0],
                "train_loss_std": loss[1],
                metric: final[0],
                f"{metric}_std": final[1],
                f"best_{metric}": best[0],
                "mib_sent_per_rank": members[0]["summary"]["comm_bytes"] / 2**20,
                "wall_time_s": float(np.mean([r["summary"]["wall_time"] for r in members])),
            }
        )
    return rows


def write_table(rows: list[dict[str, Any]], out_dir: Path, source: str | None = None) -> str:
    """Writes ``table.csv`` and ``table.md`` in ``out_dir`` (``source``: the command that made the runs, recorded
    above the table); returns the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    with open(out_dir / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)
    metric = next(k for k in keys if k.startswith("val_") and not k.endswith("_std"))
    lines = [
        f"| algorithm | seeds | steps | train loss | {metric} | best {metric} | MiB sent / rank | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['algorithm']} | {r['seeds']} | {r['steps']} | {r['train_loss']:.4f} ± {r['train_loss_std']:.4f} "
            f"| {r[metric]:.2f} ± {r[metric + '_std']:.2f} | {r['best_' + metric]:.2f} "
            f"| {r['mib_sent_per_rank']:.2f} | {r['wall_time_s']:.1f} |"
        )
    if source:
        lines = [f"Made by `{source}`.", ""] + lines
    markdown = "\n".join(lines) + "\n"
    (out_dir / "table.md").write_text(markdown)
    return markdown


def _curve(members: list[dict[str, Any]], x: str, y: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    series = [[(m[x], m[y]) for m in r["metrics"] if y in m] for r in members]
    length = min(len(s) for s in series)
    xs = np.mean([[p[0] for p in s[:length]] for s in series], axis=0)
    ys = np.array([[p[1] for p in s[:length]] for s in series])
    return xs, ys.mean(0), ys.std(0)


def figure(runs: list[dict[str, Any]], path: Path, x: str = "epoch", title: str = "") -> None:
    """Train loss (log scale) and the validation metric against ``x`` (step, epoch or wall_time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = _main_metric(runs[0])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, members in sorted(group(runs).items()):
        style = "-" if "SlowMo" in name else "--"
        for ax, y in zip(axes, ("train_loss", metric), strict=True):
            xs, mean, std = _curve(members, x, y)
            (line,) = ax.plot(xs, mean, style, label=name, linewidth=1.6)
            if len(members) > 1:
                ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    xlabel = {"epoch": "epoch", "step": "inner step", "wall_time": "wall time (s)"}[x]
    axes[0].set(yscale="log", xlabel=xlabel, ylabel="train loss")
    axes[1].set(xlabel=xlabel, ylabel=metric)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
