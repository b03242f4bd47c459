"""An experiment preset's cells, run: the quickstart and every benchmark run their cells through :func:`run_cells`
and read what the runs wrote through :func:`slowmo.report.load_run`.

Each cell (a list of overrides on top of ``+experiment=<preset>``) runs in its own directory under ``root``, named by
its overrides; a finished cell (:func:`slowmo.report.finished`) is not run again if its settings are the cell's (else
one line names what differs; ``fresh``: every cell is run anew, ``train.overwrite=true``), so a sweep that stops
resumes where it stopped. A run whose loss becomes non-finite is kept,
its ``summary.json`` saying where: an outcome to report, not an error.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import torch

from .report import finished
from .train import NonFiniteLoss, compose, run
from .train.config import CONFIG_DIR, validate
from .train.rundir import claim

ROOT = CONFIG_DIR.parent
ENTRYPOINTS = ROOT / "experiments"


def run_dir(root: Path, cell: list[str]) -> Path:
    """The directory of ``cell``'s run under ``root``: its overrides, comma-separated, one name (a config group's
    slash, as in ``slowmo/mean=eager``, written as a dot)."""
    return root / ",".join(cell).replace("/", ".")


def run_cells(
    preset: str | None,
    cells: list[list[str]],
    root: Path,
    jobs: int = 1,
    fresh: bool = False,
    rerun: str | None = None,
    done: Callable[[int, Path], None] | None = None,
) -> list[Path]:
    """Run every cell of ``preset`` (None: cells of the config tree's own defaults) not yet finished, ``jobs`` at a
    time (more than one: a process each, one CPU thread each); returns the cells' run directories, in order. Each
    run's first line says how to resume it: ``rerun`` (the command that runs the cells again, e.g. the benchmark's),
    or the cell's own training command. ``done(i, directory)``: called for each cell as it finishes (in order), so
    that a caller can record it before the others end."""
    work = [(preset, cell, run_dir(root, cell), fresh, jobs > 1, rerun) for cell in cells]
    directories = []
    with ProcessPoolExecutor(jobs) if jobs > 1 else nullcontext() as pool:
        for i, directory in enumerate(pool.map(_one, work) if pool else map(_one, work)):
            if done is not None:
                done(i, directory)
            directories.append(directory)
    return directories


def _one(work: tuple[str | None, list[str], Path, bool, bool, str | None]) -> Path:
    preset, cell, directory, fresh, pooled, rerun = work
    overrides = [*([f"+experiment={preset}"] if preset else []), *cell, *(["train.overwrite=true"] if fresh else [])]
    config = compose([*overrides, f"run_dir='{directory}'"])
    if not fresh and finished(directory):
        claim(validate(config))  # one line if the finished run was made by other settings (or older code's keys)
        return directory
    if pooled:  # the pool's size is the parallelism: one thread per run, simulated or gloo ranks alike
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    start = time.time()
    script = ENTRYPOINTS / config.task.name / "train.py"  # a task without an entrypoint of its own: digits' takes it
    script = script if script.is_file() else ENTRYPOINTS / "digits" / "train.py"
    named = preset or script.parent.name == config.task.name or any(o.startswith("task=") for o in overrides)
    task = [] if named else [f"task={config.task.name}"]
    own = f"python {script.relative_to(ROOT)} {' '.join([*task, *overrides])} run_dir='{directory}'"
    try:
        run(config, rerun=rerun or own)
    except NonFiniteLoss:
        pass  # an outcome (summary.json says "diverged" and where), not an error of the sweep
    print(f"{directory.name}: {time.time() - start:.1f} s", flush=True)
    return directory
