"""The one training loop every task shares.

``run(cfg)`` validates the config, finds this process's place in the job (torchrun, srun, or local ranks to
simulate or spawn) and runs :func:`train_rank` on every rank: per-step lr schedule, the base optimizer driven by
the base algorithm (and SlowMo), periodic evaluation of the averaged model, metrics to JSONL (and W&B), atomic
checkpoints, resume, and a clean stop on SIGTERM/SIGUSR1/SIGUSR2 that checkpoints first (:mod:`.preemption`).

A run directory ends up holding ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``summary.json`` and
``final.pt`` (the averaged model's ``state_dict`` under ``model``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from ..algorithms import ALGORITHMS
from ..comm import CommError, Communicator, launch, spawn
from ..inner import DistributedOptimizer
from ..outer import SlowMo
from ..registry import ConfigError
from ..tasks import TASKS, Task, TaskContext
from ..tasks.base import sharded_batches
from . import checkpoint, data, preemption, rundir
from .config import Config, to_dict, validate
from .divergence import Divergence
from .loggers import JsonlLogger, Loggers, WandbLogger
from .optimizers import OPTIMIZERS
from .precision import Precision
from .schedule import SCHEDULES

EVAL_PROGRESS_AFTER_S = 2.0  # an evaluation shows its progress once it has taken this long (beam search does)


class NonFiniteLoss(FloatingPointError):
    """The loss (or, at a checkpoint, a parameter) became NaN or infinite; the last good checkpoint is kept."""


def run(cfg: Any, run_name: str | None = None, rerun: str | None = None) -> dict[str, Any]:
    """Train with ``cfg``: a composed config (Hydra's, or :func:`~slowmo.train.compose`'s), a dict of overrides
    (composed onto ``configs/`` first) or a checked :class:`Config`; returns rank 0's summary.

    Before anything in the run directory is touched, :func:`~slowmo.train.rundir.claim` decides what this run does with
    it (a new run, the same run resumed, nothing to do, or a refusal), and the run's first line says so, with ``rerun``
    (default ``run_dir=<the run directory>``): the setting that resumes the run after a stop."""
    config = cfg if isinstance(cfg, Config) else validate(cfg)
    run_dir = Path(config.run_dir)
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
    claim = rundir.claim(config)
    if env.rank == 0:
        print(claim.describe(run_dir, rerun or f"run_dir={run_dir}"), file=sys.stderr, flush=True)
    if claim.action == "complete":
        return claim.summary
    with preemption.caught(announce=env.rank == 0):
        if env.source == "single":  # simulated ranks, or local processes (the task's heavy imports done once)
            imports = TASKS[config.task.name].extra.get("imports", ())
            dist = config.dist
            ranks = spawn(
                train_rank, dist.world_size, dist.backend, (config, run_dir, run_name), dist.timeout_s, imports
            )
            return ranks[0]
        torch.set_num_threads(launch.threads_per_rank(local_world_size=env.local_world_size))
        comm = launch.init_distributed(config.dist.backend, config.dist.timeout_s, env)
        try:
            return train_rank(comm, config, run_dir, run_name)
        finally:
            torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------------ builders
def build_optimizer(cfg: Config, model: torch.nn.Module, comm: Communicator) -> DistributedOptimizer:
    """Base optimizer + base algorithm (+ the outer step) from the config, each through its registry."""
    base = OPTIMIZERS[cfg.optimizer.name].build(model.parameters(), cfg.optimizer)
    algorithm = ALGORITHMS[cfg.algorithm.name].build.from_config(comm, cfg.algorithm)
    if not cfg.slowmo.enabled:
        return DistributedOptimizer(model, base, algorithm)
    return SlowMo(model, base, algorithm, **cfg.slowmo.build(comm.world_size))


def _fingerprint(cfg: Config) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed."""
    return {
        "task": cfg.task.name,
        "model": cfg.model.name,
        "width": getattr(cfg.model, "width", None),
        "algorithm": cfg.algorithm.name,
        "slowmo": cfg.slowmo.enabled,
        "shard_outer_state": cfg.slowmo.shard_outer_state,
    }


# ------------------------------------------------------------------------------------------------ one rank
class _Trainer:
    def __init__(
        self, comm: Communicator, cfg: Config, run_dir: Path, run_name: str | None, task: Task | None = None
    ) -> None:
        self.comm, self.cfg, self.run_dir = comm, cfg, run_dir
        self.rank, self.world = comm.rank, comm.world_size
        self.is_main = self.rank == 0
        self.device = self._place()
        if cfg.algorithm.procs_per_node > 1:
            launch.check_node_groups(comm, cfg.algorithm.procs_per_node, self.device)
        if self.is_main:
            _ensure_writable(run_dir)
        with comm.uncounted():
            comm.barrier()  # the run directory exists before any rank writes into it
        torch.manual_seed(cfg.seed)  # the same initial model on every rank
        self.task: Task = task if task is not None else self._build_task()
        self.channels_last = (
            cfg.train.channels_last if cfg.train.channels_last is not None else self.device.type == "cuda"
        )
        self.model = self.task.model.to(
            self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format
        )  # only 4-D weights (convolutions) change format
        self.opt = build_optimizer(cfg, self.model, comm)
        self.precision = Precision(cfg.train.precision, self.device, comm, cfg.train.clip_grad_norm)
        torch.manual_seed(cfg.seed * 1000 + self.rank + 1)  # this rank's stream (dropout); augmentation: data.Seeded
        self.sampler = data.EpochBatches(self.task.train_batches)
        self.steps_per_epoch = len(self.sampler.batches)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training set gives no full batch to each of {self.world} ranks; lower "
                "data.batch_size (or data.max_tokens) or the number of ranks"
            )
        pin, workers = self.device.type == "cuda", cfg.data.num_workers
        self.train_loader = data.loader(
            data.Seeded(self.task.train_set, cfg.seed),
            self.sampler,
            self.task.collate,
            workers,
            cfg.data.prefetch_factor,
            pin,
        )
        self.eval_loaders = {  # split -> (its dataset, this rank's loader of it)
            split: (
                dataset,
                data.loader(
                    dataset,
                    sharded_batches(len(dataset), cfg.data.eval_batch_size, self.rank, self.world),
                    self.task.collate,
                    workers,
                    cfg.data.prefetch_factor,
                    pin,
                ),
            )
            for split, dataset in (("val", self.task.val_set), ("test", self.task.test_set))
            if dataset is not None
        }
        self.lr_factor = SCHEDULES[cfg.schedule.name].build(cfg.schedule, self.steps_per_epoch)
        self.base_lrs = [group["lr"] for group in self.opt.param_groups]
        self.step, self.epoch, self.position, self.elapsed = 0, 0, 0, 0.0
        self.best: dict[str, float] = {}
        self.last_record: dict[str, Any] = {}
        self.losses: list[torch.Tensor] = []  # this rank's losses since the last read: one host sync per read
        self.loss_sum, self.loss_count = 0.0, 0
        self.divergence = Divergence()
        self.stopped_by: str | None = None  # the stop signal the ranks agreed on
        self.run_id = uuid.uuid4().hex[:16]  # names the run in W&B; a resumed run keeps its own
        self.eval_model = copy.deepcopy(self.model)
        discarding = rundir.discarding(cfg)
        if not discarding:
            self._resume()
        with comm.uncounted():
            comm.barrier()  # every rank has passed its checks: only now is an existing run discarded or changed
        if self.is_main:
            if discarding:
                rundir.discard(run_dir)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(to_dict(cfg)))
        self.loggers = Loggers(self._make_loggers(run_name) if self.is_main else [])

    def _place(self) -> torch.device:
        """This rank's device (``dist.device``) and, on a GPU, its kernel settings (``train.deterministic``)."""
        local_rank = self.rank if self.cfg.dist.backend == "simulated" else launch.detect().local_rank
        device = launch.resolve_device(self.cfg.dist.device, self.cfg.dist.backend, local_rank)
        deterministic = self.cfg.train.deterministic
        if deterministic:  # deterministic kernels where torch has them, a warning where it has none
            torch.use_deterministic_algorithms(True, warn_only=True)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.backends.cudnn.benchmark = not deterministic  # the fastest kernels, found on the first batches
            torch.backends.cudnn.deterministic = deterministic
        return device

    def _tensor(self, values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A small tensor of the loop's own (flags, losses, sums) on this rank's device, where every backend can
        reduce it."""
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _build_task(self) -> Task:
        """Rank 0 first (it may write files into the run directory for the others), then the others."""
        cfg = self.cfg
        context = TaskContext(self.rank, self.world, cfg.seed, self.run_dir)

        def build() -> Task:
            return TASKS[cfg.task.name].build(cfg.task, cfg.data, cfg.model, context)

        if self.is_main:
            task = build()
        with self.comm.uncounted():
            self.comm.barrier()
        return task if self.is_main else build()

    def _make_loggers(self, run_name: str | None) -> list:
        loggers: list = [JsonlLogger(self.run_dir / "metrics.jsonl", self.step)]
        if self.cfg.logger.wandb:
            config = to_dict(self.cfg)
            loggers.append(
                WandbLogger(
                    self.cfg, config, self.run_dir, run_name or self.run_dir.name, self.run_dir.parent.name, self.run_id
                )
            )
        return loggers

    # ----------------------------------------------------------------------------------- checkpoints
    def _save(self) -> None:
        self._read_losses()  # a NaN loss stops the run before its checkpoint is written
        model_state = self.model.state_dict()
        for name, tensor in model_state.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise NonFiniteLoss(
                    f"rank {self.rank}: {name} is not finite at step {self.step}; no checkpoint of it "
                    "was written, the last good one is kept (lower optimizer.lr or check the data)"
                )
        directory = self.run_dir / "checkpoints" / f"step_{self.step}"
        state = {
            "model": model_state,
            "optimizer": self.opt.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "position": self.position,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "precision": self.precision.state_dict(),
            "loss_sum": self.loss_sum,
            "loss_count": self.loss_count,
            "elapsed": self.elapsed + time.time() - self.t0,
            "best": self.best,
            "divergence": self.divergence.state_dict(),
            "run_id": self.run_id,
            "fingerprint": _fingerprint(self.cfg),
        }
        try:
            checkpoint.save_rank(directory, self.rank, state)
        except OSError as error:
            raise OSError(
                f"rank {self.rank}: cannot write checkpoint {directory} ({error.strerror}); free space or "
                "fix permissions, then resume: the previous checkpoint is still valid"
            ) from None
        with self.comm.uncounted():
            self.comm.barrier()
        if self.is_main:
            checkpoint.mark_complete(directory, self.world, self.cfg.train.keep_checkpoints)

    def _resume(self) -> None:
        for directory in checkpoint.candidates(self.run_dir / "checkpoints", self.world):
            try:
                state, ok = checkpoint.load_rank(directory, self.rank), 1.0
            except ValueError as error:
                warnings.warn(f"skipping checkpoint: {error}", stacklevel=2)
                state, ok = None, 0.0
            with self.comm.uncounted():
                agreed = self.comm.all_reduce(self._tensor([ok])).item() == self.world
            if not agreed:
                continue
            if state["fingerprint"] != _fingerprint(self.cfg):
                raise ConfigError(
                    f"the checkpoint in {directory} is of another run ({state['fingerprint']}), this "
                    f"run is {_fingerprint(self.cfg)}; use a new run directory or train.resume=never"
                )
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.precision.load_state_dict(state["precision"])
            self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
            self.loss_sum, self.loss_count = state["loss_sum"], state["loss_count"]
            self.elapsed, self.best = state["elapsed"], state["best"]
            self.divergence.load_state_dict(state.get("divergence", {}))  # absent from checkpoints made before it
            self.run_id = state.get("run_id", self.run_id)
            torch.set_rng_state(state["rng"])
            if self.device.type == "cuda" and state["cuda_rng"] is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
            if self.is_main:
                print(f"resuming from {directory} (step {self.step})", file=sys.stderr, flush=True)
            return

    # ----------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, averaged: bool = True) -> dict[str, float]:
        """The task's metrics of the model averaged over ranks, on the validation split (``val_*``) and, if the task
        has one, the test split (``test_*``); the training state is left untouched."""
        model = self.model
        if averaged:
            with self.comm.uncounted():
                tensors = self.opt.averaged_parameters()
            targets = list(self.eval_model.parameters()) + [
                b for b in self.eval_model.buffers() if b.is_floating_point()
            ]
            for target, value in zip(targets, tensors, strict=True):
                target.detach().copy_(value)
            model = self.eval_model
        was_training = model.training
        model.eval()
        metrics: dict[str, float] = {}
        for split, (dataset, loader) in self.eval_loaders.items():
            sums = None
            batches = tqdm(  # shown only for an evaluation that takes seconds (beam search)
                data.on_device(loader, self.device, self.channels_last),
                total=len(loader),
                desc=f"evaluating {split}",
                leave=False,
                delay=EVAL_PROGRESS_AFTER_S,
                disable=not (self.is_main and self.cfg.logger.progress),
                dynamic_ncols=True,
            )
            with self.precision.autocast():
                for batch in batches:
                    batch_sums = self.task.eval_sums(model, batch).to(self.device, torch.float64)
                    sums = batch_sums if sums is None else sums + batch_sums
                if sums is None:  # this rank had no example of the split: its share of every sum is 0
                    first = data.to_device(self.task.collate([dataset[0]]), self.device, self.channels_last)
                    sums = torch.zeros_like(self.task.eval_sums(model, first), dtype=torch.float64, device=self.device)
            with self.comm.uncounted():
                self.comm.all_reduce(sums)
            for name, value in self.task.metrics(sums.cpu()).items():
                metrics[name if split == "val" else "test_" + name.removeprefix("val_")] = value
        model.train(was_training)
        return metrics

    # ----------------------------------------------------------------------------------- the loop
    def train(self) -> dict[str, Any]:
        try:
            return self._train()
        except CommError as error:  # a peer died or hung: every surviving rank says where it was
            raise CommError(f"{error} (during step {self.step + 1})") from None
        finally:
            for loader in (self.train_loader, *(loader for _, loader in self.eval_loaders.values())):
                data.close(loader)

    def _train(self) -> dict[str, Any]:
        cfg = self.cfg
        self.t0 = time.time()
        bar = tqdm(
            total=cfg.train.max_steps,
            initial=self.step,
            disable=not (self.is_main and cfg.logger.progress),
            dynamic_ncols=True,
            desc=self.run_dir.name,
        )
        status = "completed"
        self.model.train()
        while self.step < cfg.train.max_steps and status == "completed":
            self.sampler.set_epoch(self.epoch, self.position)
            for batch in data.on_device(self.train_loader, self.device, self.channels_last):
                factor = self.lr_factor(self.step)
                for group, lr in zip(self.opt.param_groups, self.base_lrs, strict=True):
                    group["lr"] = lr * factor
                with self.precision.autocast():
                    loss = self.task.loss(self.model, batch)
                self.opt.zero_grad(set_to_none=True)
                self.precision.backward_and_step(loss, self.opt)
                self.losses.append(loss.detach())
                self.step += 1
                self.position += 1
                bar.update(1)
                record = None
                if self.step % cfg.logger.log_every == 0 or self._eval_due() or self.step == cfg.train.max_steps:
                    record = self._record()
                if self._eval_due() and self.step < cfg.train.max_steps:
                    record.update(self._with_best(self.evaluate()))
                if record is not None:
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}")
                    if self.step == cfg.train.max_steps or self.divergence.stopped:
                        self.last_record = record  # logged with the final metrics
                    else:
                        self.loggers.log(record)
                if self.divergence.stopped:  # every rank logged the same loss: they stop together
                    status = "diverged"
                    break
                checkpoint_due = bool(cfg.train.checkpoint_every) and self.step % cfg.train.checkpoint_every == 0
                stop = (
                    self._stop_signal()
                    if cfg.train.signal_check_every and self.step % cfg.train.signal_check_every == 0
                    else None
                )
                if checkpoint_due or stop:  # one checkpoint even when both fall on this step
                    self._save()
                if stop:
                    status, self.stopped_by = ("interrupted" if stop == "SIGINT" else "preempted"), stop
                if stop or self.step == cfg.train.max_steps:
                    break
            if self.position >= len(self.sampler.batches):
                self.epoch, self.position = self.epoch + 1, 0
        bar.close()
        return self._finish(status)

    def _eval_due(self) -> bool:
        return bool(self.cfg.train.eval_every) and self.step % self.cfg.train.eval_every == 0

    def _stop_signal(self) -> str | None:
        """The stop signal the ranks agree on (the lowest rank's that received one), or None: one all-gather."""
        received = preemption.received() if preemption.STOP.is_set() else None
        mine = self._tensor([float(signal.Signals[received].value if received else 0)])
        everyone = torch.empty(self.world, device=self.device)
        with self.comm.uncounted():
            self.comm.all_gather(everyone, mine)
        agreed = next((int(code) for code in everyone.tolist() if code), 0)
        return signal.Signals(agreed).name if agreed else None

    def _read_losses(self) -> None:
        """Bring this rank's pending losses to the host (one sync); if any rank's is not finite, every rank stops
        (the ranks agree with one all-gather, so that none goes on to write a checkpoint of that step)."""
        if not self.losses:
            return
        values = torch.stack(self.losses).tolist()
        first = self.step - len(values)
        bad = next(((first + i, v) for i, v in enumerate(values) if not math.isfinite(v)), None)
        mine = self._tensor([-1.0, 0.0] if bad is None else [float(bad[0]), bad[1]], torch.float64)
        everyone = torch.empty(2 * self.world, dtype=torch.float64, device=self.device)
        with self.comm.uncounted():
            self.comm.all_gather(everyone, mine)
        for rank, (step, value) in enumerate(everyone.view(self.world, 2).tolist()):
            if step >= 0:
                raise NonFiniteLoss(
                    f"rank {rank}: loss is {value} at step {int(step)}; stopped before any "
                    "checkpoint of it was written (lower optimizer.lr or check the data)"
                )
        self.losses.clear()
        self.loss_sum, self.loss_count = self.loss_sum + sum(values), self.loss_count + len(values)

    def _record(self) -> dict[str, Any]:
        """The metrics of the steps since the last record: train loss (mean over them and over ranks), lr, bytes."""
        self._read_losses()
        with self.comm.uncounted():
            loss = self.comm.all_reduce(self._tensor([self.loss_sum / self.loss_count], torch.float64), "mean").item()
        self.loss_sum, self.loss_count = 0.0, 0
        if self.divergence.update(self.step, loss):
            self.divergence.stopped = self.cfg.train.stop_on_divergence
            if self.is_main:
                print(f"warning: {self.divergence.message()}", file=sys.stderr, flush=True)
        record = {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "train_loss": loss,
            "lr": self.opt.param_groups[0]["lr"],
            "comm_bytes": self.comm.stats()["total"],
            "wall_time": self.elapsed + time.time() - self.t0,
        }
        if self.precision.scaler is not None:
            record.update(loss_scale=self.precision.scale, skipped_steps=self.precision.skipped)
        return record

    def _with_best(self, metrics: dict[str, float]) -> dict[str, float]:
        """The best value of every validation metric so far; the test metrics are those of the evaluation with the
        best main metric (the test split chooses nothing)."""
        main = self.task.main_metric
        if main in metrics and (
            main not in self.best
            or (metrics[main] < self.best[main] if main.endswith("loss") else metrics[main] > self.best[main])
        ):
            self.best.update({key: value for key, value in metrics.items() if key.startswith("test_")})
        for key, value in metrics.items():
            if not key.startswith("test_"):
                better = min if key.endswith("loss") else max
                self.best[key] = better(self.best.get(key, value), value)
        return metrics

    def _finish(self, status: str) -> dict[str, Any]:
        if status in ("preempted", "interrupted"):
            self.loggers.close()
            return {
                "status": status,
                "signal": self.stopped_by,
                "step": self.step,
                "rank": self.rank,
                "run_dir": str(self.run_dir),
            }
        self.opt.synchronize()  # the final exact average: every rank holds the averaged model
        final = self._with_best(self.evaluate(averaged=False))
        stats = self.comm.stats()
        summary = {
            "status": "diverged" if self.divergence.record() else status,
            "diverged": self.divergence.record(),
            "steps": self.step,
            "epochs": self.step / self.steps_per_epoch,
            "final": final,
            "best": dict(self.best),
            "comm_bytes": stats["total"],
            "comm_bytes_by_kind": stats,
            "wall_time": self.elapsed + time.time() - self.t0,
            "world_size": self.world,
            "rank": self.rank,
            "algorithm": self.cfg.algorithm.name,
            "slowmo": self.cfg.slowmo.enabled,
            "main_metric": self.task.main_metric,
            **({"notes": self.task.notes} if self.task.notes else {}),
            "device": str(self.device),
            "precision": self.precision.name,
            "skipped_steps": self.precision.skipped,
            "threads": torch.get_num_threads(),
            "run_dir": str(self.run_dir),
        }
        if self.is_main:
            self.loggers.log({**self.last_record, "comm_bytes": stats["total"], **final})
            model = {name: tensor.cpu() for name, tensor in self.model.state_dict().items()}
            torch.save({"model": model}, self.run_dir / "final.pt")
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.loggers.close()
        return summary


def train_rank(
    comm: Communicator, cfg: Config, run_dir: Path, run_name: str | None = None, task: Task | None = None
) -> dict[str, Any]:
    """Everything one rank does in a run; returns the run's summary.

    ``task``: a task built by the caller (its model, data, loss and metric) instead of ``cfg.task``'s, e.g. a
    benchmark's in-memory data; with an in-process communicator (simulated ranks, or a process group this process
    has joined)."""
    with preemption.caught(announce=comm.rank == 0):  # a rank process of the local launcher catches its own
        return _Trainer(comm, cfg, run_dir, run_name, task).train()


def _ensure_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"run directory {run_dir} is not writable ({error.strerror}); set hydra.run.dir "
            "(or run_dir) to a writable path"
        ) from None
