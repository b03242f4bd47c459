"""Table 1's CIFAR-10 rows on one GPU: an epoch of each cell of ``paper_cifar10_one_gpu``, timed, and what a row costs.

The preset runs the paper's CIFAR-10 cells (32 workers x 128 images, the CIFAR ResNet-18, 200 epochs, the paper's
schedule and SlowMo settings: ``configs/experiment/paper_cifar10.yaml``) as 32 simulated ranks on one GPU. For each
cell (AR-SGD, Local SGD, SGP, OSGP, each without and with SlowMo) this runs ``STEPS`` steps (one epoch and a bit:
4,096 images a step) over a CIFAR-10 of the real size written in torchvision's format with random pixels (the time
does not depend on them), and reads from the run's metrics the seconds per step after the first (which pays for
cuDNN's autotuning) and the final evaluation's seconds. From them: an epoch, a 200-epoch run (its steps and its
evaluations) and the whole sweep of the preset (8 cells x 5 seeds), in GPU hours.

Writes ``<out>/one_gpu_cifar10.csv`` and ``.md`` (default ``results/one_gpu_cifar10``), naming the GPU, and their
README. Run: ``python benchmarks/one_gpu_cifar10.py`` (minutes on an H100); ``scripts/gpu_check.sh`` runs it.
``--device cpu --small`` runs the same code at toy width and data on the CPU, for Local SGD + SlowMo (the test
suite does, so that this script keeps working where no GPU is).
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import torch

from slowmo.tasks.cifar10 import write_batches
from slowmo.train import compose, run
from slowmo.train.config import sweep

from common import gpu_arguments, read
from readme import record

PRESET = "paper_cifar10_one_gpu"
SWEEP = sweep(PRESET)  # its cells x seeds, as Hydra's sweeper runs them
CELLS = [list(c) for c in dict.fromkeys(tuple(o for o in cell if not o.startswith("seed=")) for cell in SWEEP)]
SEEDS = len(SWEEP) // len(CELLS)
SIZES = {  # images per CIFAR batch file (5 training files, 1 test file), steps timed, cells, overrides
    "full": dict(per_file=10_000, steps=13, cells=CELLS, overrides=[]),
    "small": dict(  # the sweep's last cell (the outer step over the most involved base), at toy width and data
        per_file=16,
        steps=2,
        cells=CELLS[-1:],
        overrides=read("one_gpu_cifar10")["small"].split(),  # configs/benchmark/one_gpu_cifar10.yaml
    ),
}


def time_cell(cell: list[str], size: dict, root: Path, workdir: Path) -> dict:
    """Run ``size['steps']`` steps of one cell; its seconds per step (after the first) and of its final evaluation,
    and the preset's steps and evaluations of a whole run."""
    run_dir = workdir / "-".join(o.split("=")[-1] for o in cell)
    config = compose(
        [
            f"+experiment={PRESET}",
            *cell,
            f"data.root={root}",
            "data.verify_checksums=false",
            *size["overrides"],
            f"run_dir={run_dir}",
        ]
    )
    steps, eval_every = config.train.max_steps, config.train.eval_every  # the preset's, before the timing's
    config.train.max_steps, config.train.eval_every, config.train.checkpoint_every = size["steps"], 0, 0
    config.logger.log_every, config.logger.progress = 1, False
    summary = run(config)
    walls = {r["step"]: r["wall_time"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    per_step = (walls[size["steps"]] - walls[1]) / (size["steps"] - 1)
    images = config.dist.world_size * config.data.batch_size
    evaluation = summary["wall_time"] - walls[size["steps"]]  # the final one, and the run's close
    return {
        "cell": " ".join(cell),
        "world_size": config.dist.world_size,
        "images_per_step": images,
        "s_per_step": per_step,
        "s_per_epoch": per_step * 5 * size["per_file"] / images,
        "s_per_evaluation": evaluation,
        "s_per_run": per_step * steps + (steps // eval_every) * evaluation,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    small = "toy width and data, the sweep's last cell (a smoke run)"
    args, machine = gpu_arguments(__doc__, "results/one_gpu_cifar10", small, argv)
    size = SIZES["small" if args.small else "full"]
    with tempfile.TemporaryDirectory() as tmp:
        root = write_batches(Path(tmp) / "cifar", size["per_file"])
        rows = [time_cell(cell, size, root, Path(tmp)) for cell in size["cells"]]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "one_gpu_cifar10.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"`{PRESET}` on {machine} (torch {torch.__version__}): {rows[0]['world_size']} simulated ranks x "
        f"{rows[0]['images_per_step'] // rows[0]['world_size']} images",
        "",
        "| cell | s / step | s / epoch | s / evaluation | h / run | h / 5 seeds |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['cell']} | {row['s_per_step']:.3f} | {row['s_per_epoch']:.1f} | {row['s_per_evaluation']:.1f} | "
            f"{row['s_per_run'] / 3600:.2f} | {SEEDS * row['s_per_run'] / 3600:.1f} |"
        )
    total = SEEDS * sum(row["s_per_run"] for row in rows) / 3600
    lines += ["", f"The sweep of these cells ({len(rows)} x {SEEDS} seeds): {total:.1f} GPU hours.", ""]
    (args.out / "one_gpu_cifar10.md").write_text("\n".join(lines))
    record(args.out, __file__, argv, device=machine, sweep_gpu_hours=round(total, 2))
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
