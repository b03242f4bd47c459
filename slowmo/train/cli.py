"""The command-line face of the training stack: the per-task Hydra entrypoints call :func:`entrypoint`."""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ..comm import CommError
from ..registry import ConfigError
from . import preemption
from .config import CONFIG_DIR
from .loop import NonFiniteLoss, run

REQUEUE_EXIT_CODE = 3  # a preempted run that wrote its checkpoint


def _main(cfg: DictConfig) -> None:
    name = HydraConfig.get().job.override_dirname or None
    try:
        summary = run(cfg, run_name=name)
    except (
        ConfigError,
        ValueError,
        NonFiniteLoss,
        OSError,
        CommError,
    ) as error:  # expected failures: one line, no trace
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if summary["status"] == "preempted":
        if summary["rank"] == 0:
            print(
                f"preempted at step {summary['step']}: checkpoint written to {summary['run_dir']}"
                f"{'; requeueing the job' if preemption.requeue_wanted() else ''}",
                file=sys.stderr,
                flush=True,
            )
        preemption.requeue(summary["rank"])  # under submitit, rank 0 exits in here
        sys.exit(REQUEUE_EXIT_CODE)
    if summary["rank"] != 0:
        return  # one report per job, from rank 0
    final = ", ".join(f"{k}={v:.4g}" for k, v in summary["final"].items())
    print(
        f"done: {summary['steps']} steps, {final}, {summary['comm_bytes'] / 2**20:.1f} MiB sent per rank, "
        f"{summary['wall_time']:.1f} s -> {summary['run_dir']}"
    )


def entrypoint(task: str) -> None:
    """Run Hydra on ``configs/train_<task>.yaml`` (config.yaml with this task; ``task=`` still overrides it)."""
    hydra.main(config_path=str(CONFIG_DIR), config_name=f"train_{task}", version_base="1.3")(_main)()
