"""Tables and paper-style figures from run directories alone (``config.yaml``, ``metrics.jsonl``, ``summary.json``).

Runs that differ only in their seed are one cell (:func:`group`): one line, the mean with a band of ± one sample std,
and mean ± sample std in tables; cells are named by what tells them apart."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .algorithms import ALGORITHMS
from .train.optimizers import OPTIMIZERS

FINISHED = ("completed", "diverged")  # the endings whose numbers a table takes (not preempted, interrupted, failed)


def finished(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a run that got to its end: its ``summary.json`` says completed or diverged (or, from
    runs before every ending wrote one, a ``diverged.json`` says where a non-finite loss stopped it)."""
    run_dir = Path(run_dir)
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status") in FINISHED
    except (OSError, ValueError):
        return (run_dir / "diverged.json").is_file()


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """A run, read from its directory: ``config``, ``metrics``, ``summary`` (None for a run of older code that stopped
    on a non-finite loss, whose ``diverged.json`` says where), its ``status`` and its :func:`numbers`. The one reader
    of the quickstart and the benchmarks."""
    run_dir = Path(run_dir)
    stopped = (run_dir / "diverged.json").is_file() and not (run_dir / "summary.json").is_file()
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
        "main_metric": metric,
        "steps": summary["steps"] if summary else (records[-1]["step"] if records else 0),
        "best_train_loss": min(losses, default=float("nan")),
        "final_train_loss": losses[-1] if losses else float("nan"),
        f"best_{metric}": best.get(metric, float("nan")),
        f"{test}_at_best_val": best.get(test, float("nan")),
        "epoch_of_best_val": best.get("epoch", float("nan")),
        f"final_{metric}": (summary or {}).get("final", {}).get(metric, float("nan")),
        "best_val_loss": min((r["val_loss"] for r in records if "val_loss" in r), default=float("nan")),
        "mib_sent_per_rank": summary["comm_bytes"] / 2**20 if summary else float("nan"),
    }


def base_label(algorithm: str, optimizer: str) -> str:
    """A base algorithm's label with the base optimizer's in place of "SGD" (AR-Adam, Local Adam)."""
    return ALGORITHMS[algorithm].label.replace("SGD", OPTIMIZERS[optimizer].label)


def label(run: dict[str, Any]) -> str:
    """The run's line in tables and figures: :func:`base_label` and the outer step's ("Local SGD + SlowMo")."""
    return _label_of(run["config"])


# what a cell is not: the seed, where a run lies and what it is called, how it logs, and launcher instructions
NOT_THE_CELL = ("seed", "run_dir", "experiment", "logger.", "train.overwrite", "train.resume", "data.root",
                "data.spm_model", "dist.lighthouse")  # fmt: skip


def settings(run: dict[str, Any]) -> dict[str, Any]:
    """A run's cell: every resolved config value (``section.key``) but the seed, paths, names and logging; the outer
    step's keys only when it is on."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                flat[prefix + key] = value

    walk(run["config"], "")
    off = not flat.get("slowmo.enabled", True)
    return {
        key: value
        for key, value in flat.items()
        if not key.startswith(NOT_THE_CELL) and not (off and key.startswith("slowmo.") and key != "slowmo.enabled")
    }


def _frozen(settings: dict[str, Any]) -> tuple:
    return tuple(sorted((key, json.dumps(value, sort_keys=True)) for key, value in settings.items()))


def group(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The runs by cell (runs that differ in nothing but their seed), one run per seed (a second run of a cell's seed
    is left out, with a note on stderr); each cell named by :func:`label` and the settings that tell it from the
    other cells (``Local SGD + SlowMo, beta=0.3``), in the order of the runs."""
    cells: dict[tuple, dict[int, dict[str, Any]]] = {}
    for run in runs:
        members = cells.setdefault(_frozen(settings(run)), {})
        seed = run["config"].get("seed")
        if seed in members:
            print(f"note: {run['dir']} repeats seed {seed} of {members[seed]['dir']}; left out", file=sys.stderr)
        else:
            members[seed] = run
    return {name: list(members.values()) for name, members in zip(_names(list(cells)), cells.values(), strict=True)}


def names(configs: list[dict[str, Any]]) -> list[str]:
    """The names of the cells these configs (:func:`slowmo.train.config.to_dict`'s) make, as :func:`group` names them:
    the labels, and the settings that tell the cells apart."""
    return _names([_frozen(settings({"config": config})) for config in configs])


def differing(keys: list[tuple]) -> list[str]:
    """The settings with more than one value among the cells of ``keys`` (:func:`_frozen` settings) that have them (a
    setting only some cells have, an algorithm's own or the outer step's, is told by the label)."""
    values: dict[str, set] = {}
    for key in keys:
        for name, value in key:
            values.setdefault(name, set()).add(value)
    return sorted(name for name, seen in values.items() if len(seen) > 1)


NAMED_BY_LABEL = ("algorithm.name", "optimizer.name", "slowmo.enabled", "slowmo.label")


def _names(keys: list[tuple]) -> list[str]:
    shown = [k for k in differing(keys) if k not in NAMED_BY_LABEL]
    short = {k: k.rsplit(".", 1)[-1] for k in shown}
    short = {k: v if list(short.values()).count(v) == 1 else k for k, v in short.items()}
    names = []
    for key in keys:
        settings = dict(key)
        config: dict[str, Any] = {}
        for name in NAMED_BY_LABEL:  # the label's own settings, as a config
            section, field = name.split(".")
            config.setdefault(section, {})[field] = json.loads(settings.get(name, "null"))
        base = _label_of(config)
        extra = ", ".join(f"{short[k]}={json.loads(settings[k])}" for k in shown if k in settings)
        names.append(f"{base}, {extra}" if extra else base)
    return names


def _label_of(config: dict[str, Any]) -> str:
    name = base_label(config["algorithm"]["name"], config["optimizer"]["name"])
    outer = config["slowmo"]
    return name + (f" + {outer['label']}" if outer.get("enabled") and outer.get("label") else "")


def title(runs: list[dict[str, Any]]) -> str:
    """A figure's default title: the task, the ranks and the steps (when all runs share them), and what differs."""
    from .tasks import TASKS

    first = runs[0]["config"]
    parts = [TASKS[first["task"]["name"]].label]
    for key, unit in (("dist.world_size", "ranks"), ("train.max_steps", "steps")):
        values = {json.dumps(settings(r).get(key)) for r in runs}
        if len(values) == 1:
            parts.append(f"{json.loads(values.pop())} {unit}")
    varies = [k.rsplit(".", 1)[-1] for k in differing([_frozen(settings(r)) for r in runs]) if k not in NAMED_BY_LABEL]
    return ", ".join(parts) + (f"; by {', '.join(dict.fromkeys(varies))}" if varies else "")


def mean_std(values: list[float], digits: int = 2) -> str:
    """``mean ± sample std`` (ddof 1) of the finite values; one value alone (no ±); none: n/a."""
    finite = [v for v in values if not np.isnan(v)]
    if not finite:
        return "n/a"
    if len(finite) == 1:
        return f"{finite[0]:.{digits}f}"
    return f"{np.mean(finite):.{digits}f} ± {np.std(finite, ddof=1):.{digits}f}"


def _main_metric(run: dict[str, Any]) -> str:
    return run["numbers"]["main_metric"]


def table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell: seeds, final train loss, final and best validation metric (mean and sample std over the
    seeds; the std is None for one seed), bytes per rank, wall time (and simulated time, for runs on the virtual
    clock)."""
    rows = []
    for name, members in group(runs).items():
        metric = _main_metric(members[0])
        numbers = [r["numbers"] for r in members]
        row: dict[str, Any] = {"cell": name, "seeds": len(members), "steps": numbers[0]["steps"]}
        for key, column in (("final_train_loss", "train_loss"), (f"final_{metric}", metric),
                            (f"best_{metric}", f"best_{metric}")):  # fmt: skip
            values = [n[key] for n in numbers]
            row[column] = float(np.mean(values))
            row[f"{column}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else None
        row["mib_sent_per_rank"] = float(np.mean([n["mib_sent_per_rank"] for n in numbers]))
        row["wall_time_s"] = float(np.mean([r["summary"]["wall_time"] for r in members if r["summary"]] or [np.nan]))
        if on_the_clock(members):  # the simulator's virtual clock: the time at the last record
            row["sim_time_s"] = float(np.mean([r["metrics"][-1]["sim_time"] for r in members]))
        rows.append(row)
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
    unit = metric_label(metric)

    def cell(r: dict[str, Any], key: str, digits: int) -> str:
        std = r[f"{key}_std"]
        return f"{r[key]:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")

    simulated = all("sim_time_s" in r for r in rows)
    lines = [
        f"| cell | seeds | steps | train loss | final {unit} | best {unit} | MiB sent / rank | time (s) |"
        + (" simulated time (s) |" if simulated else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if simulated else ""),
    ]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {r['seeds']} | {r['steps']} | {cell(r, 'train_loss', 4)} | {cell(r, metric, 2)} "
            f"| {cell(r, 'best_' + metric, 2)} | {r['mib_sent_per_rank']:.2f} | {r['wall_time_s']:.1f} |"
            + (f" {r['sim_time_s']:.1f} |" if simulated else "")
        )
    lines = ["Mean ± sample std (ddof 1) over the seeds; a cell of one seed shows its value alone.", ""] + lines
    if source:
        lines = [f"Made by `{source}`.", ""] + lines
    markdown = "\n".join(lines) + "\n"
    (out_dir / "table.md").write_text(markdown)
    return markdown


UNITS = {"acc": "accuracy (%)", "bleu": "BLEU", "bleu_tok": "tokenized BLEU", "loss": "loss"}


def metric_label(key: str) -> str:
    """An axis or column label with its unit: ``val_acc`` -> ``validation accuracy (%)``, ``train_loss`` -> ``train
    loss``, ``val_acc_top5`` -> ``validation top-5 accuracy (%)``."""
    split, _, name = key.partition("_")
    split = {"val": "validation", "test": "test", "train": "train"}.get(split, split)
    top = re.fullmatch(r"acc_top(\d+)", name)
    what = f"top-{top.group(1)} accuracy (%)" if top else UNITS.get(name, name.replace("_", " "))
    return f"{split} {what}"


def on_the_clock(runs: list[dict[str, Any]]) -> bool:
    """Whether every record of every run carries the virtual clock's time (``sim_time``)."""
    return all("sim_time" in m for r in runs for m in r["metrics"])


def _curve(members: list[dict[str, Any]], x: str, y: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    series = [[(m[x], m[y]) for m in r["metrics"] if y in m] for r in members]
    length = min(len(s) for s in series)
    xs = np.mean([[p[0] for p in s[:length]] for s in series], axis=0)
    ys = np.array([[p[1] for p in s[:length]] for s in series])
    return xs, ys.mean(0), ys.std(0, ddof=1) if len(series) > 1 else np.zeros(length)


def figure(runs: list[dict[str, Any]], path: Path, x: str = "epoch", title_: str | None = None) -> None:
    """Train loss (log scale) and the validation metric (a marker at each evaluation) against ``x`` (step, epoch,
    wall_time, or sim_time: the simulator's virtual clock, ``dist/clock=<scenario>``), a line per cell (mean over its
    seeds, a band of ± one sample std where it has more than one); the title names the task and what differs unless
    ``title_`` is given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = _main_metric(runs[0])
    cells = group(runs)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for name, members in cells.items():
        style = "-" if members[0]["config"]["slowmo"]["enabled"] else "--"
        for ax, y, marker in zip(axes, ("train_loss", metric), ("", "o"), strict=True):
            xs, mean, std = _curve(members, x, y)
            label = f"{name} ({len(members)} seed{'s' if len(members) > 1 else ''})"
            (line,) = ax.plot(xs, mean, style, marker=marker, markersize=3, label=label, linewidth=1.6)
            if len(members) > 1:
                ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    xlabel = {"epoch": "epoch", "step": "inner step", "wall_time": "wall time (s)", "sim_time": "simulated time (s)"}[x]
    axes[0].set(yscale="log", xlabel=xlabel, ylabel=metric_label("train_loss"))
    axes[1].set(xlabel=xlabel, ylabel=metric_label(metric))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    bands = any(len(m) > 1 for m in cells.values())
    heading = title(runs) if title_ is None else title_
    fig.suptitle(heading + ("  (mean; band: ± 1 sample std over seeds)" if bands else ""), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
