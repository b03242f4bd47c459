"""Time to accuracy on the virtual clock: MNIST-1D at 1, 10 and 100 Gbit/s, with equal, mixed and straggling workers.

Each cell of ``configs/benchmark/clock.yaml`` (AR-SGD, Local SGD, SlowMo, DiLoCo, eager and streaming SlowMo over
Local SGD) trains MNIST-1D on 16 simulated ranks for 3 seeds, as the fidelity benchmark's MNIST-1D block does (the 1D
CNN, 780 inner steps, the tuned lr; ``results/fidelity``), evaluated every 26 steps. The clock changes no number of
these synchronous methods (``tests/engine/test_clock.py``), so each cell's time is taken apart from its training: the
same optimizer (algorithm, outer step, fragments) replays the 780 steps on 16 simulated ranks with the virtual clock,
on a small model whose links run slower by its size's ratio to ResNet-50's (as ``benchmarks/table2.py`` does), so that
every message and average takes the time ResNet-50's would; a step takes a node's 258.4 ms (table2's calibration) over
the rank's speed. The scenarios: 1, 10 and 100 Gbit/s between any two ranks, 0.05 ms per message; equal workers,
mixed ones (speeds 1, 0.75, 0.5, 0.25, cycled), or straggling ones (each step 4x as long with probability 0.05,
seeded draws, the same for every cell). A cell's time to the target is that of its first evaluation at or above it,
per seed. What it is not: ResNet-50's own learning curve (MNIST-1D's steps stand in for its steps).

Writes ``results/clock/``: ``time_to_accuracy.csv`` (per cell, scenario and seed), ``time_to_accuracy.md`` (mean ±
sample std over the seeds, in seconds), ``accuracy_vs_time.png`` and its ``README.md``. Run: ``python
benchmarks/clock.py`` (about 25 minutes on 2 cores: 18 training runs, resumed from ``runs/clock`` when stopped).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from slowmo.train import compose, run

from common import clock_times, config, suite, write_csv
from readme import record

SUITE = suite("clock")  # configs/benchmark/clock.yaml


def step_times(cell: list[str], workers: str, gbps: float) -> list[float]:
    """When every rank is done with each inner step of ``cell`` in the scenario (``workers``: a dist/clock file): the
    latest of the ranks' times (the averaged model an evaluation scores needs them all)."""
    cfg = config(SUITE["base"].split(), cell, [workers])
    ranks = clock_times(
        cfg,
        SUITE["parameters"],
        step_ms=SUITE["step_ms"],
        latency_ms=SUITE["latency_ms"],
        regions=1,
        inside_gbps=gbps,
        between_gbps=None,
    )
    return [max(times) for times in zip(*ranks, strict=True)]


def curve(cell: list[str], seed: int, runs: Path, name: str) -> list[tuple[int, float]]:
    """(step, validation accuracy) at each evaluation of the cell's training run (run, or read where it is done)."""
    run_dir = runs / f"{name.replace(' ', '_')}_seed{seed}"
    run(compose([*SUITE["base"].split(), *cell, f"seed={seed}", f"run_dir={run_dir}"]))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_acc"]) for r in records if "val_acc" in r]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/clock"))
    parser.add_argument("--runs", type=Path, default=Path("runs/clock"))
    args = parser.parse_args(argv)
    target, seeds, scenarios = SUITE["target"], SUITE["seeds"], SUITE["scenarios"]
    curves = {name: {s: curve(cell, s, args.runs, name) for s in seeds} for name, cell in SUITE["cells"].items()}
    rows, timed = [], {}
    for name, cell in SUITE["cells"].items():
        for workers, clock in scenarios["workers"].items():
            for gbps in scenarios["gbps"]:
                times = step_times(cell, clock, gbps)
                timed[(name, workers, gbps)] = times
                for seed in seeds:
                    reached = next((step for step, acc in curves[name][seed] if acc >= target), None)
                    rows.append(
                        {
                            "cell": name,
                            "workers": workers,
                            "gbps": gbps,
                            "seed": seed,
                            "step": reached or "",
                            "seconds": round(times[reached - 1], 1) if reached else "",
                            "run_seconds": round(times[-1], 1),
                        }
                    )
                print(name, workers, gbps, [r["seconds"] for r in rows[-len(seeds) :]])
    write_csv(args.out / "time_to_accuracy.csv", rows)
    (args.out / "time_to_accuracy.md").write_text(_table(rows, target, scenarios))
    _figure(curves, timed, scenarios, args.out / "accuracy_vs_time.png")
    record(args.out, __file__, argv, target=target)


def _table(rows: list[dict], target: float, scenarios: dict) -> str:
    """Mean ± sample std over the seeds of the seconds to the target, a column per scenario; n/m: reached by n of m."""
    columns = [(w, g) for w in scenarios["workers"] for g in scenarios["gbps"]]
    head = " | ".join(f"{w}, {g:g} Gbit/s" for w, g in columns)
    lines = [
        f"Seconds on the virtual clock to {target:g} % validation accuracy, mean ± sample std over the seeds that "
        "reach it (n/m: n of the m seeds do; -: none).",
        "",
        f"| cell | {head} |",
        "|---|" + "---|" * len(columns),
    ]
    for cell in dict.fromkeys(r["cell"] for r in rows):
        cells = []
        for w, g in columns:
            mine = [r for r in rows if r["cell"] == cell and r["workers"] == w and r["gbps"] == g]
            got = [r["seconds"] for r in mine if r["seconds"] != ""]
            text = f"{statistics.mean(got):.0f}" if got else "-"
            text += f" ± {statistics.stdev(got):.0f}" if len(got) > 1 else ""
            cells.append(text + ("" if len(got) == len(mine) else f" ({len(got)}/{len(mine)})"))
        lines.append(f"| {cell} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _figure(curves: dict, timed: dict, scenarios: dict, path: Path) -> None:
    """Validation accuracy (mean over the seeds) against the clock's time, a panel per scenario."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workers, rates = list(scenarios["workers"]), scenarios["gbps"]
    fig, axes = plt.subplots(len(workers), len(rates), figsize=(4.2 * len(rates), 3.2 * len(workers)), sharey=True)
    for i, w in enumerate(workers):
        for j, g in enumerate(rates):
            ax = axes[i][j]
            for name, per_seed in curves.items():
                points = list(zip(*per_seed.values(), strict=True))
                steps = [p[0][0] for p in points]
                accuracy = [statistics.mean(acc for _, acc in p) for p in points]
                ax.plot([timed[(name, w, g)][s - 1] / 60 for s in steps], accuracy, label=name, linewidth=1.4)
            ax.set(title=f"{w} workers, {g:g} Gbit/s", xlabel="simulated time (min)", ylim=(40, 95))
            ax.grid(alpha=0.3)
        axes[i][0].set_ylabel("validation accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("MNIST-1D, 16 ranks, ResNet-50's bytes and step time (mean of 3 seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
