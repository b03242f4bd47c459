"""``run(cfg)``: one run, from the checked config to rank 0's summary. It finds this process's place in the job
(torchrun, srun, or local ranks to simulate or spawn), decides what the run does with its run directory before
anything there is touched (:mod:`.rundir`), says so in its first line, catches the stop signals, and runs
:func:`~slowmo.train.loop.train_rank` on every rank.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ..comm import elastic, launch, spawn
from ..comm.clock import Clock
from ..registry import ConfigError
from ..tasks import TASKS
from . import preemption, rundir
from .config import Config, check_world_size, validate
from .loop import train_rank


def run(cfg: Any, run_name: str | None = None, rerun: str | None = None) -> dict[str, Any]:
    """Train with ``cfg``: a composed config (Hydra's, or :func:`~slowmo.train.compose`'s), a dict of overrides
    (composed onto ``configs/`` first) or a checked :class:`Config`; returns rank 0's summary.

    Before anything in the run directory is touched, :func:`~slowmo.train.rundir.claim` decides what this run does with
    it (a new run, the same run resumed, nothing to do, or a refusal), and the run's first line says so, with ``rerun``
    (default ``run_dir=<the run directory>``): the setting that resumes the run after a stop."""
    config = cfg if isinstance(cfg, Config) else validate(cfg)
    run_dir = Path(config.run_dir)
    if config.dist.backend == elastic.BACKEND:
        return _run_elastic(config, run_dir, run_name, rerun)
    env = launch.detect()
    if config.train.deterministic:  # read when cuBLAS starts, so before any rank touches the GPU
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if env.source != "single":  # this process is one rank of a torchrun / srun job, whose size the run records
        if config.dist.backend == "simulated":
            raise ConfigError(
                f"launched by {env.source} with {env.world_size} processes: set dist.backend=gloo or nccl"
            )
        config = dataclasses.replace(config, dist=dataclasses.replace(config.dist, world_size=env.world_size))
        launch.check_placement(config.algorithm.procs_per_node, config.dist.backend, env.local_world_size)
        launch.resolve_device(config.dist.device, config.dist.backend, env.local_rank)
    else:
        if config.dist.backend == "nccl":
            launch.check_placement(config.algorithm.procs_per_node, "nccl", config.dist.world_size)
        launch.resolve_device(config.dist.device, config.dist.backend)  # one line here rather than one per rank
    check_world_size(config)
    claim = rundir.claim(config)
    if env.rank == 0:
        print(claim.describe(run_dir, rerun or f"run_dir={run_dir}"), file=sys.stderr, flush=True)
        untuned = _untuned(config)
        if untuned:
            print(untuned, file=sys.stderr, flush=True)
    if claim.action == "complete":
        return claim.summary
    with preemption.caught(announce=env.rank == 0):
        if env.source == "single":  # simulated ranks, or local processes (the task's heavy imports done once)
            imports = TASKS[config.task.name].extra.get("imports", ())
            dist = config.dist
            clock = Clock(dist.clock, dist.world_size, config.seed) if dist.clock is not None else None
            ranks = spawn(
                train_rank, dist.world_size, dist.backend, (config, run_dir, run_name), dist.timeout_s, imports, clock
            )
            return ranks[0]
        torch.set_num_threads(launch.threads_per_rank(local_world_size=env.local_world_size))
        comm = launch.init_distributed(config.dist.backend, config.dist.timeout_s, env)
        try:
            return train_rank(comm, config, run_dir, run_name)
        finally:
            torch.distributed.destroy_process_group()


def _untuned(config: Config) -> str | None:
    """The one note for an outer step on a task whose defaults were never checked with one (and no preset that sets
    its own values), else None."""
    task = TASKS[config.task.name]
    if not config.slowmo.enabled or config.experiment or task.extra.get("defaults_checked"):
        return None
    checked = ", ".join(entry.name for entry in TASKS if entry.extra.get("defaults_checked"))
    return (
        f"note: {task.label}'s defaults were not checked with an outer step (benchmarks/defaults.py checks {checked}): "
        f"optimizer.lr={config.optimizer.lr} and the outer step's own are generic; tune them, or start from a preset "
        "of configs/experiment/"
    )


def _run_elastic(config: Config, run_dir: Path, run_name: str | None, rerun: str | None) -> dict[str, Any]:
    """dist=torchft: this machine's replicas and their lighthouse, or (``dist.replica_id`` set, or
    ``$REPLICA_GROUP_ID``) one replica of a job whose lighthouse runs elsewhere."""
    from . import elastic as replicas  # (imports the training loop)

    replica_id, lighthouse = elastic.replica_from_env(config.dist.replica_id, config.dist.lighthouse)
    if replica_id is not None and lighthouse is None:
        raise ConfigError(
            f"replica {replica_id} of a dist=torchft job needs its lighthouse: set dist.lighthouse=<host:port> "
            f"or ${elastic.LIGHTHOUSE_ENV}"
        )
    if replica_id is not None and replica_id >= config.dist.world_size:
        raise ConfigError(f"dist.replica_id={replica_id} is not below dist.world_size={config.dist.world_size}")
    launch.resolve_device(config.dist.device, "gloo")
    claim = rundir.claim(config)
    if replica_id is None or replica_id == 0:
        print(claim.describe(run_dir, rerun or f"run_dir={run_dir}"), file=sys.stderr, flush=True)
    if claim.action == "complete":
        return claim.summary
    if claim.action == "overwrite" and replica_id is None:
        rundir.discard(run_dir)
    with preemption.caught(announce=replica_id in (None, 0)):
        if replica_id is None:
            return replicas.run_local(config, run_dir, run_name)
        torch.set_num_threads(launch.threads_per_rank())  # one replica per job: its CPUs
        return replicas.run_replica(config, run_dir, run_name, replica_id, lighthouse)
