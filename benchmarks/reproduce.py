"""The paper's claims at small scale, with seeds: 16 simulated ranks on scikit-learn's digits (offline, CPU).

Four experiments, every cell over ``--seeds`` seeds (mean ± std), all at the same number of inner steps:

- ``table1``: AR-SGD, Local SGD (H = tau), SGP and OSGP, each without and with SlowMo (tau = 12, alpha = 1,
  beta = 0.7, base momentum buffers reset at every outer step, as in the paper's CIFAR-10 setup);
- ``synthetic``: the same cells on the teacher-student task (``slowmo/tasks/synthetic.py``), 1,200 steps: a task
  that is not solved in a few epochs;
- ``beta``: Local SGD + SlowMo with beta in 0, 0.3, 0.5, 0.7, 0.9 (beta = 0 is plain Local SGD);
- ``tau``: Local SGD (H = tau) without and with SlowMo for tau in 6, 12, 24, 48.

Writes ``results/repro/``: ``<experiment>.csv`` (one row per run), ``<experiment>.md`` (mean ± std per cell),
``table1_curves.png`` / ``synthetic_curves.png`` (train loss and val accuracy against epoch, as the paper's figures) and ``beta.png`` /
``tau.png``. The run directories go to ``runs/repro/`` (not committed); a finished run is not run again.

    python benchmarks/reproduce.py            # all three, 3 seeds: about 25 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from slowmo import report
from slowmo.train import run

RANKS, STEPS, SYNTHETIC_STEPS, TAU, BETA = 16, 600, 1200, 12, 0.7


def config(run_dir: Path, algorithm: dict, slowmo: dict | None, seed: int, experiment: str) -> dict:
    task, steps = ("synthetic", SYNTHETIC_STEPS) if experiment == "synthetic" else ("digits", STEPS)
    return {"task": {"name": task}, "model": {"name": "mlp", "width": 64}, "data": {"batch_size": 8},
            "algorithm": algorithm,
            "slowmo": {"enabled": slowmo is not None, "tau": TAU, "alpha": 1.0, "beta": BETA, "base_buffers": "reset",
                       **(slowmo or {})},
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
            "schedule": {"name": "constant"}, "logger": {"progress": False, "log_every": 12},
            "dist": {"backend": "simulated", "world_size": RANKS},
            "train": {"max_steps": steps, "eval_every": steps // 10, "resume": "never"}, "seed": seed,
            "run_dir": str(run_dir)}


def cells(experiment: str) -> dict[str, tuple[dict, dict | None]]:
    """name -> (algorithm section, SlowMo overrides or None for SlowMo off)."""
    if experiment in ("table1", "synthetic"):
        bases = {"ar_sgd": {"name": "allreduce"}, "local_sgd": {"name": "localsgd", "period": TAU},
                 "sgp": {"name": "sgp"}, "osgp": {"name": "osgp"}}
        return {f"{name}{suffix}": (algorithm, on) for name, algorithm in bases.items()
                for suffix, on in (("", None), ("_slowmo", {}))}
    if experiment == "beta":
        return {f"beta_{beta}": ({"name": "localsgd", "period": None}, {"beta": beta})
                for beta in (0.0, 0.3, 0.5, 0.7, 0.9)}
    if experiment == "tau":
        return {f"tau_{tau}{suffix}": ({"name": "localsgd", "period": tau}, on)
                for tau in (6, 12, 24, 48) for suffix, on in (("", None), ("_slowmo", {"tau": tau}))}
    raise ValueError(f"unknown experiment {experiment!r}; choose table1, synthetic, beta or tau")


def one(args: tuple[str, dict, Path]) -> Path:
    name, cfg, run_dir = args
    if not (run_dir / "summary.json").is_file():
        torch.set_num_threads(1)
        start = time.time()
        run(cfg)
        print(f"{run_dir.parent.name}/{run_dir.name}: {time.time() - start:.0f} s", flush=True)
    return run_dir


def row(experiment: str, name: str, seed: int, run_dir: Path) -> dict:
    r = report.load_run(run_dir)
    s = r["summary"]
    losses = [m["train_loss"] for m in r["metrics"] if "train_loss" in m]
    return {"experiment": experiment, "cell": name, "seed": seed, "label": report.label(r),
            "tau": r["config"]["slowmo"]["tau"] if s["slowmo"] else r["config"]["algorithm"]["period"],
            "beta": r["config"]["slowmo"]["beta"] if s["slowmo"] else 0.0,
            "final_train_loss": losses[-1], "best_train_loss": min(losses), "final_val_acc": s["final"]["val_acc"],
            "best_val_acc": s["best"]["val_acc"], "mib_sent_per_rank": s["comm_bytes"] / 2**20, "steps": s["steps"]}


def summarize(rows: list[dict], out: Path, experiment: str) -> str:
    with open(out / f"{experiment}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| cell | run | seeds | best train loss | final train loss | best val acc (%) | final val acc (%) | "
             "MiB sent / rank |", "|---|---|---|---|---|---|---|---|"]
    for cell in dict.fromkeys(r["cell"] for r in rows):
        members = [r for r in rows if r["cell"] == cell]
        stats = {key: f"{np.mean([m[key] for m in members]):{fmt}} ± {np.std([m[key] for m in members]):{fmt}}"
                 for key, fmt in (("best_train_loss", ".4f"), ("final_train_loss", ".4f"), ("best_val_acc", ".2f"),
                                  ("final_val_acc", ".2f"))}
        lines.append(f"| {cell} | {members[0]['label']} | {len(members)} | {stats['best_train_loss']} | "
                     f"{stats['final_train_loss']} | {stats['best_val_acc']} | {stats['final_val_acc']} | "
                     f"{members[0]['mib_sent_per_rank']:.2f} |")
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
            ax.errorbar(xs, [np.mean(v) for v in values], yerr=[np.std(v) for v in values], marker="o", capsize=3,
                        label=members[0]["label"].replace(" + SlowMo", "") + (" + SlowMo" if slowmo_on else ""))
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
    parser.add_argument("experiments", nargs="*", default=["table1", "synthetic", "beta", "tau"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one CPU thread each)")
    parser.add_argument("--runs", type=Path, default=Path("runs/repro"))
    parser.add_argument("--out", type=Path, default=Path("results/repro"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = [(experiment, name, seed, args.runs / experiment / f"{name}_s{seed}", algorithm, slowmo)
            for experiment in args.experiments for name, (algorithm, slowmo) in cells(experiment).items()
            for seed in range(args.seeds)]
    start = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        list(pool.map(one, [(name, config(d, a, s, seed, e), d) for e, name, seed, d, a, s in work]))
    for experiment in args.experiments:
        rows = [row(e, name, seed, d) for e, name, seed, d, _, _ in work if e == experiment]
        print(f"\n## {experiment}\n\n{summarize(rows, args.out, experiment)}")
        if experiment in ("table1", "synthetic"):
            runs = [report.load_run(d) for e, _, _, d, _, _ in work if e == experiment]
            task, steps = ("digits", STEPS) if experiment == "table1" else ("teacher-student", SYNTHETIC_STEPS)
            report.figure(runs, args.out / f"{experiment}_curves.png", "epoch",
                          f"{task}, {RANKS} simulated ranks, {steps} steps, tau = {TAU}, beta = {BETA}, "
                          f"{args.seeds} seeds (mean ± std)")
        else:
            ablation_figure(rows, experiment, args.out / f"{experiment}.png",
                            f"digits, {RANKS} simulated ranks, Local SGD ± SlowMo: {experiment} ablation "
                            f"({args.seeds} seeds)")
    provenance_path = args.out / "provenance.json"
    provenance = json.loads(provenance_path.read_text()) if provenance_path.is_file() else {}
    for experiment in args.experiments:
        dirs = [d for e, _, _, d, _, _ in work if e == experiment]
        provenance[experiment] = {
            "command": f"python benchmarks/reproduce.py {experiment} --seeds {args.seeds}", "runs": len(dirs),
            "ranks": RANKS, "steps": SYNTHETIC_STEPS if experiment == "synthetic" else STEPS, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                                                        f"torch {torch.__version__}, {args.jobs} runs at a time",
            "train_wall_time_s": round(sum(report.load_run(d)["summary"]["wall_time"] for d in dirs))}
    provenance_path.write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"done in {time.time() - start:.0f} s")

if __name__ == "__main__":
    main()
