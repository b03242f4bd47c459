"""The paper's claims at small scale, with seeds: 16 simulated ranks on scikit-learn's digits (offline, CPU).

Four experiment presets (``configs/experiment/<preset>.yaml``), each a sweep over its cells and 3 seeds (mean ±
sample std), all at the same number of inner steps:

- ``repro_table1_digits``: AR-SGD, Local SGD (H = tau), SGP and OSGP, each without and with SlowMo (tau = 12,
  alpha = 1, beta = 0.7, base momentum buffers reset at every outer step, as in the paper's CIFAR-10 setup);
- ``repro_table1_synthetic``: the same cells on the teacher-student task (``slowmo/tasks/synthetic.py``), 1,200
  steps: a task that is not solved in a few epochs;
- ``repro_beta``: Local SGD + SlowMo with beta in 0, 0.3, 0.5, 0.7, 0.9;
- ``repro_tau``: Local SGD (H = tau) without and with SlowMo for tau in 6, 12, 24, 48.

Writes ``results/reproduce/``: ``<preset>.csv`` (one row per run, with the overrides that made it), ``<preset>.md``
(mean ± sample std per cell), ``<preset>_curves.png`` (train loss and val accuracy against epoch, as the paper's
figures) or ``<preset>.png`` (the ablations), ``provenance.json`` and the ``README.md`` of them. The run directories go
to ``runs/reproduce/`` (not committed); a finished run is not run again. Any cell can be re-run on its own:
``python experiments/digits/train.py +experiment=<preset> <the cell's overrides>``.

    python benchmarks/reproduce.py            # all four: about 7 min on 2 CPU cores, 2 runs at a time
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from slowmo import report
from slowmo.cells import run_cells
from slowmo.train.config import sweep

from readme import record

PRESETS = ("repro_table1_digits", "repro_table1_synthetic", "repro_beta", "repro_tau")


def row(preset: str, cell: list[str], r: dict) -> dict:
    """A run's row (``r``: :func:`slowmo.report.load_run`'s)."""
    config, n = r["config"], r["numbers"]
    return {
        "experiment": preset,
        "cell": ",".join(o for o in cell if not o.startswith("seed=")),
        "seed": config["seed"],
        "label": report.label(r),
        "tau": config["slowmo"]["tau"] if config["slowmo"]["enabled"] else config["algorithm"].get("period"),
        "beta": config["slowmo"]["update"]["beta"] if config["slowmo"]["enabled"] else 0.0,
        **{key: n[key] for key in ("final_train_loss", "best_train_loss", "final_val_acc", "best_val_acc")},
        "mib_sent_per_rank": n["mib_sent_per_rank"],
        "steps": n["steps"],
        "overrides": " ".join([f"+experiment={preset}", *cell]),
    }


def summarize(rows: list[dict], out: Path, experiment: str) -> str:
    with open(out / f"{experiment}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "Mean ± sample std (ddof 1) over the seeds.",
        "",
        "| cell | run | seeds | best train loss | final train loss | best val acc (%) | final val acc (%) | "
        "MiB sent / rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell in dict.fromkeys(r["cell"] for r in rows):
        members = [r for r in rows if r["cell"] == cell]
        stats = {
            key: report.mean_std([m[key] for m in members], digits)
            for key, digits in (
                ("best_train_loss", 4),
                ("final_train_loss", 4),
                ("best_val_acc", 2),
                ("final_val_acc", 2),
            )
        }
        lines.append(
            f"| {cell} | {members[0]['label']} | {len(members)} | {stats['best_train_loss']} | "
            f"{stats['final_train_loss']} | {stats['best_val_acc']} | {stats['final_val_acc']} | "
            f"{members[0]['mib_sent_per_rank']:.2f} |"
        )
    markdown = "\n".join(lines) + "\n"
    (out / f"{experiment}.md").write_text(markdown)
    return markdown


def ablation_figure(rows: list[dict], key: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for slowmo_on in sorted({r["label"].endswith("SlowMo") for r in rows}):
        members = [r for r in rows if r["label"].endswith("SlowMo") == slowmo_on]
        xs = sorted({r[key] for r in members})
        for ax, y in zip(axes, ("best_train_loss", "best_val_acc"), strict=True):
            values = [[r[y] for r in members if r[key] == x] for x in xs]
            ax.errorbar(
                xs,
                [np.mean(v) for v in values],
                yerr=[np.std(v, ddof=1) for v in values],
                marker="o",
                capsize=3,
                label=members[0]["label"].replace(" + SlowMo", "") + (" + SlowMo" if slowmo_on else ""),
            )
    axes[0].set(yscale="log", xlabel=key, ylabel="best train loss")
    axes[1].set(xlabel=key, ylabel="best val accuracy (%)")
    if key == "tau":
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=list(PRESETS))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    parser.add_argument("--runs", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--out", type=Path, default=Path("results/reproduce"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    for preset in args.presets:
        cells = sweep(preset)
        runs = [report.load_run(d) for d in run_cells(preset, cells, args.runs / preset, args.jobs)]
        rows = [row(preset, cell, r) for cell, r in zip(cells, runs, strict=True)]
        print(f"\n## {preset}\n\n{summarize(rows, args.out, preset)}")
        setup = next(r["config"] for r in runs if r["config"]["slowmo"]["enabled"])  # a SlowMo cell's tau and beta
        seeds = len({r["seed"] for r in rows})
        where = (
            f"{setup['task']['name']}, {setup['dist']['world_size']} simulated ranks, "
            f"{setup['train']['max_steps']} steps"
        )
        if preset.startswith("repro_table1"):
            report.figure(
                runs,
                args.out / f"{preset}_curves.png",
                "epoch",
                f"{where}, tau = {setup['slowmo']['tau']}, beta = {setup['slowmo']['update']['beta']}, {seeds} seeds",
            )
        else:
            key = preset.split("_")[1]
            ablation_figure(
                rows, key, args.out / f"{preset}.png", f"{where}, Local SGD ± SlowMo: {key} ablation ({seeds} seeds)"
            )
        record(
            args.out,
            __file__,
            argv,
            key=preset,
            preset=f"configs/experiment/{preset}.yaml",
            runs=len(runs),
            runs_at_a_time=args.jobs,
            train_wall_time_s=round(sum(r["summary"]["wall_time"] for r in runs)),
        )
    print(f"done in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
