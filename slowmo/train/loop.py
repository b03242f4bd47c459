"""The one training loop every task shares: :func:`train_rank`, what one rank does in a run (:func:`slowmo.train.run`
starts it on every rank): per-step lr schedule, the base optimizer driven by the base algorithm (and SlowMo),
periodic evaluation of the averaged model (:mod:`.evaluation`), metrics to JSONL (and W&B), atomic checkpoints of
the model, the optimizer and the run's progress (:mod:`.progress`), resume, a divergence watch, and a clean stop on
SIGTERM/SIGUSR1/SIGUSR2/SIGINT that checkpoints first (:mod:`.preemption`).

A run directory ends up holding ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``summary.json`` and
``final.pt`` (the averaged model's ``state_dict`` under ``model``).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from ..algorithms import ALGORITHMS
from ..comm import CommError, Communicator, launch
from ..flat import is_per_parameter
from ..inner import DistributedOptimizer
from ..outer import SlowMo
from ..registry import ConfigError
from ..replicas import ShardedReplicas, load_model_state_, local
from ..tasks import TASKS, Task, TaskContext
from . import checkpoint, data, preemption, rundir
from .config import Config, to_dict
from .evaluation import Evaluator, track_best
from .loggers import Loggers
from .losses import Losses, NonFiniteLoss
from .optimizers import OPTIMIZERS
from .precision import Precision
from .progress import Progress
from .schedule import SCHEDULES


# ------------------------------------------------------------------------------------------------ builders
def build_optimizer(cfg: Config, model: torch.nn.Module, comm: Communicator) -> DistributedOptimizer:
    """Base optimizer + base algorithm (+ the outer step) from the config, each through its registry."""
    base = OPTIMIZERS[cfg.optimizer.name].build(model.parameters(), cfg.optimizer)
    algorithm = ALGORITHMS[cfg.algorithm.name].build.from_config(comm, cfg.algorithm)
    if not cfg.slowmo.enabled:
        return DistributedOptimizer(model, base, algorithm)
    return SlowMo(model, base, algorithm, **cfg.slowmo.arguments())


def reshardable(state: dict[str, Any], directory: Path, saved_k: int) -> None:
    """ConfigError (one line) where a checkpoint of sharded replicas holds, besides the model, the base optimizer's
    state and the outer state per parameter, a tensor laid out by its k (OSGP's messages in flight, a fragment's
    mean in flight, an outer torch optimizer's state): it resumes only with its own k."""

    def laid_out(node: Any, at: str) -> str | None:
        if isinstance(node, dict) and not is_per_parameter(node):
            return next(filter(None, (laid_out(v, f"{at}/{key}") for key, v in node.items())), None)
        if isinstance(node, list | tuple):
            return next(filter(None, (laid_out(v, f"{at}/{i}") for i, v in enumerate(node))), None)
        return at if torch.is_tensor(node) and node.numel() > 1 else None

    optimizer = {key: value for key, value in state["optimizer"].items() if key != "base"}
    found = laid_out(optimizer, "optimizer")
    if found:
        raise ConfigError(
            f"the checkpoint in {directory} holds {found}, laid out for {saved_k} ranks per replica; resume it with "
            f"dist.replica_size={saved_k} (another k reshards the model, the base optimizer and SlowMomentum's "
            "x_{t,0} and u, and the compressed and eager means' per-parameter state)"
        )


def place_model(
    cfg: Config, model: torch.nn.Module, comm: Communicator, device_type: str
) -> tuple[torch.nn.Module, Communicator]:
    """The model and the group the base algorithm runs on: all ranks, each with a whole copy, or, with
    dist.replica_size = k > 1, the model sharded by FSDP2 inside each replica of k ranks and the group of the ranks
    holding the same shard in the other replicas (AR-SGD: HSDP)."""
    if cfg.dist.replica_size == 1:
        return model, comm
    replicas = ShardedReplicas(comm, cfg.dist.replica_size, device_type)
    return replicas.shard(model, ALGORITHMS[cfg.algorithm.name].build.averages_gradients), replicas.cross


def _fingerprint(cfg: Config) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed."""
    return {
        "task": cfg.task.name,
        "model": cfg.model.name,
        "width": getattr(cfg.model, "width", None),
        "algorithm": cfg.algorithm.name,
        "slowmo": cfg.slowmo.enabled,
        "mean": cfg.slowmo.mean.name if cfg.slowmo.enabled else None,  # (a sharded state: cut in this run's m)
        **({"replica_size": cfg.dist.replica_size} if cfg.dist.replica_size > 1 else {}),  # (the shards' cut)
    }


class Ending(Enum):
    """How a run ends (its summary's ``status``)."""

    COMPLETED = "completed"
    DIVERGED = "diverged"
    PREEMPTED = "preempted"  # a SIGTERM, SIGUSR1 or SIGUSR2: checkpointed, to be requeued
    INTERRUPTED = "interrupted"  # a Ctrl-C: checkpointed


# ------------------------------------------------------------------------------------------------ one rank
class _Trainer:
    def __init__(
        self, comm: Communicator, cfg: Config, run_dir: Path, run_name: str | None, task: Task | None = None
    ) -> None:
        self.comm, self.cfg, self.run_dir = comm, cfg, run_dir
        self.local = comm.local()  # the loop's own agreements: all ranks, or an elastic replica alone
        self.rank, self.world = comm.seat  # this rank's data shard and random stream
        self.is_main = self.local.rank == 0
        local_rank = self.rank if cfg.dist.backend == "simulated" else launch.detect().local_rank
        self.device = launch.place(cfg.dist.device, cfg.dist.backend, local_rank, cfg.train.deterministic)
        if cfg.algorithm.procs_per_node > 1:
            launch.check_node_groups(comm, cfg.algorithm.procs_per_node, self.device)
        if self.is_main:
            rundir.ensure_writable(run_dir)
        with self.local.uncounted():
            self.local.barrier()  # the run directory exists before any rank writes into it
        torch.manual_seed(cfg.seed)  # the same initial model on every rank
        self.task: Task = task if task is not None else self._build_task()
        self.channels_last = (
            cfg.train.channels_last if cfg.train.channels_last is not None else self.device.type == "cuda"
        )
        self.model = self.task.model.to(  # (only 4-D weights, convolutions, change format)
            self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format
        )
        loading, show = cfg.data, self.is_main and cfg.logger.progress
        self.evaluator = Evaluator(self.task, self.model, loading, self.local, self.device, self.channels_last, show)
        self.model, across = place_model(cfg, self.model, comm, self.device.type)
        self.opt = build_optimizer(cfg, self.model, across)
        self.precision = Precision(cfg.train.precision, self.device, comm, cfg.train.clip_grad_norm)
        torch.manual_seed(cfg.seed * 1000 + self.rank + 1)  # this rank's stream (dropout); augmentation: data.Seeded
        self.sampler = data.EpochBatches(self.task.train_batches)
        self.steps_per_epoch = len(self.sampler.batches)
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training set gives no full batch to each of {self.world} ranks; lower "
                "data.batch_size (or data.max_tokens) or the number of ranks"
            )
        pin = self.device.type == "cuda"
        self.train_loader = data.loader(
            data.Seeded(self.task.train_set, cfg.seed),
            self.sampler,
            self.task.collate,
            loading.num_workers,
            loading.prefetch_factor,
            pin,
        )
        self.lr_factor = SCHEDULES[cfg.schedule.name].build(cfg.schedule, self.steps_per_epoch)
        self.base_lrs = [group["lr"] for group in self.opt.param_groups]
        self.progress = Progress()
        self.losses = Losses(self.local, self.progress, self.device)  # this rank's, since the last read
        self.last_record: dict[str, Any] = {}
        self.stopped_by: str | None = None  # the stop signal the ranks agreed on
        discarding = rundir.discarding(cfg)
        if not discarding:
            self._resume()
        with self.local.uncounted():
            self.local.barrier()  # every rank has passed its checks: only now is an existing run discarded or changed
        if self.is_main:
            if discarding:
                rundir.discard(run_dir)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(to_dict(cfg)))
        self.loggers = Loggers(cfg, run_dir, run_name, self.progress) if self.is_main else Loggers()
        self.healed = False
        self._batches: Iterator[Any] | None = None  # the training loader's batches, from the data position _at
        self._at: tuple[int, int] | None = None
        comm.on_round(lambda vote: self.loggers.log({"step": self.progress.step, **vote}))
        comm.join(self._state, self._heal)  # an elastic replica behind its peers takes their state here

    def _build_task(self) -> Task:
        """Rank 0 first (it may write files into the run directory for the others), then the others."""
        cfg = self.cfg
        context = TaskContext(self.rank, self.world, cfg.seed, self.run_dir)

        def build() -> Task:
            return TASKS[cfg.task.name].build(cfg.task, cfg.data, cfg.model, context)

        if self.is_main:
            task = build()
        with self.local.uncounted():
            self.local.barrier()
        return task if self.is_main else build()

    # ----------------------------------------------------------------------------------- checkpoints
    def _save(self) -> None:
        self.losses.read()  # a NaN loss stops the run before its checkpoint is written
        step = self.progress.step
        for name, tensor in self.model.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(local(tensor)).all():
                raise NonFiniteLoss(
                    f"rank {self.rank}: {name} is not finite at step {step}; no checkpoint of it "
                    "was written, the last good one is kept (lower optimizer.lr or check the data)",
                    finite_steps=step - 1,
                )
        state = {
            **self._state(),
            "comm_bytes": self.comm.stats(),  # this rank's counters: a resumed run counts on (not a heal's)
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "fingerprint": _fingerprint(self.cfg),
            "elapsed": self.progress.elapsed + time.time() - self.t0,
        }
        directory, keep = self.run_dir / "checkpoints" / f"step_{step}", self.cfg.train.keep_checkpoints
        checkpoint.save(directory, self.local, state, keep, f"rank {self.rank}")

    def _state(self) -> dict[str, Any]:
        """The training state a checkpoint holds and a healing replica receives: the model, the optimizer (the base
        optimizer's state, SlowMo's x_{t,0} and u), the loss scaler, the progress (step, epoch, data position: the lr
        schedule follows the step) and the group's membership counters."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "precision": self.precision.state_dict(),
            "membership": self.comm.state_dict(),
            **self.progress.state_dict(),
        }

    def _load(self, state: dict[str, Any]) -> None:
        load_model_state_(self.model, state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state["precision"])
        self.comm.load_state_dict(state.get("membership", {}))  # (absent from checkpoints before it)
        self.progress.load_state_dict(state)

    def _heal(self, state: dict[str, Any]) -> None:
        """A live peer's state (dist=torchft), taken before this replica's next inner step."""
        self._load(state)
        self.losses.clear()  # (the peer's progress holds its own)
        self.healed = True
        print(f"replica {self.rank}: healed from a peer at step {self.progress.step}", file=sys.stderr, flush=True)

    def _after_heal(self) -> bool:
        """Whether a heal came; its state is then this replica's checkpoint of that step (what it received), and the
        next batch the one at the peer's data position (:meth:`_next_batch`)."""
        healed, self.healed = self.healed, False
        if healed:
            self.loggers.log({"step": self.progress.step, "healed": True, "time": time.time()})
            if self.cfg.train.checkpoint_every:
                self._save()
        return healed

    def _resume(self) -> None:
        k, ranks = self.cfg.dist.replica_size, self.local  # (the ranks that write a checkpoint together)
        m = ranks.world_size // k

        def file_of(saved: int) -> int | None:  # another k: the first rank of this rank's replica, k_old = saved / m
            return (ranks.rank // k) * (saved // m) if saved % m == 0 and saved // m > 1 else None

        root = self.run_dir / "checkpoints"
        like = next(self.model.parameters())
        directory, state, skipped = checkpoint.newest(root, self.local, self.device, like, file_of)
        unreadable = f" ({'; '.join(skipped)}: skipped)" if skipped else ""
        if directory is None:
            if skipped and self.is_main:
                print(f"starting over at step 0: no checkpoint could be read{unreadable}", file=sys.stderr, flush=True)
            return
        saved = checkpoint.saved_world(directory)
        resharded = f", resharded from {saved // m} to {k} ranks per replica" if saved != ranks.world_size else ""
        mine = _fingerprint(self.cfg)
        if resharded:
            mine = {**{key: v for key, v in mine.items() if key != "replica_size"}, "replica_size": saved // m}
            reshardable(state, directory, saved // m)
        if state["fingerprint"] != mine:
            raise ConfigError(
                f"the checkpoint in {directory} is of another run ({state['fingerprint']}), this "
                f"run is {_fingerprint(self.cfg)}; use a new run directory or train.resume=never"
            )
        self._load(state)
        self.comm.restore_stats(state.get("comm_bytes", {}))  # (absent from checkpoints before it)
        if not resharded:  # (resharded: each rank keeps the random stream it started with)
            torch.set_rng_state(state["rng"])
            if self.device.type == "cuda" and state["cuda_rng"] is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if self.is_main:
            print(
                f"resuming at step {self.progress.step} from {directory}{resharded}{unreadable}",
                file=sys.stderr,
                flush=True,
            )

    def _latest_time(self) -> float:
        """The latest of the ranks' times on the virtual clock: when every rank is done with the step recorded (each
        rank's own, gathered off the clock)."""
        times = torch.zeros(self.comm.world_size, dtype=torch.float64)
        times[self.comm.rank] = self.comm.time()
        with self.comm.uncounted():
            self.comm.all_reduce(times)
        return times.max().item()

    def _evaluate(self, averaged: bool = True) -> dict[str, float]:
        """The metrics of the model averaged over the ranks (or of this rank's: after the final average), with the
        best so far updated."""
        averaged = averaged and self.comm.agrees_between_rounds  # (else: no collective outside a round's vote)
        with self.comm.uncounted():
            values = self.opt.averaged_parameters() if averaged else self.opt.whole_parameters()
        metrics = self.evaluator(self.model, self.precision, values)
        return track_best(self.progress.best, metrics, self.task.main_metric)

    # ----------------------------------------------------------------------------------- the loop
    def train(self) -> dict[str, Any]:
        """The run, to its end; whatever the end, rank 0 leaves its record in ``summary.json`` (a run stopped by a
        non-finite loss: ``diverged``; by an error: ``failed``, with the error) beside ``metrics.jsonl``."""
        try:
            return self._train()
        except CommError as error:  # a peer died or hung: every surviving rank says where it was
            told = CommError(f"{error} (during step {self.progress.step + 1})")
            self._summarize_failure("failed", str(told))
            raise told from None
        except NonFiniteLoss as error:
            self._summarize_failure("diverged", str(error), steps=error.finite_steps)
            raise
        except Exception as error:
            self._summarize_failure("failed", f"{type(error).__name__}: {error}")
            raise
        finally:
            data.close(self.train_loader)
            self.evaluator.close()

    def _train(self) -> dict[str, Any]:
        """Inner steps to ``train.max_steps``, each followed by what falls on it: the round's end (on an elastic group a
        vote, the next quorum and maybe a heal), a record of the losses and an evaluation, a checkpoint, a stop."""
        cfg, progress = self.cfg, self.progress
        self.t0 = time.time()
        show = self.is_main and cfg.logger.progress
        bar = tqdm(total=cfg.train.max_steps, initial=progress.step, disable=not show, dynamic_ncols=True)
        bar.set_description(self.run_dir.name)
        self.model.train()
        self._after_heal()
        ending = Ending.COMPLETED if progress.step >= cfg.train.max_steps else None
        while ending is None:
            self._step(self._next_batch())
            bar.update(1)
            last = progress.step == cfg.train.max_steps
            self.comm.next_round(last)
            if self._after_heal():  # a peer's state, at its step: the record and the stop check of it were the peer's
                continue
            loss = self._log(last)
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.3f}")
            ending = self._ending(last)
        bar.close()
        return self._finish(ending)

    def _next_batch(self) -> Any:
        """The batch at the run's data position (epoch, position): the loader's next, the next epoch's first once an
        epoch is done, or, where the position moved otherwise (a heal took a peer's), the loader started there."""
        progress = self.progress
        if self._batches is None or self._at != (progress.epoch, progress.position):
            self.sampler.set_epoch(progress.epoch, progress.position)
            self._batches = iter(data.on_device(self.train_loader, self.device, self.channels_last))
        batch = next(self._batches, None)
        if batch is None:  # the epoch is done
            progress.epoch, progress.position = progress.epoch + 1, 0
            self.sampler.set_epoch(progress.epoch)
            self._batches = iter(data.on_device(self.train_loader, self.device, self.channels_last))
            batch = next(self._batches)
        self._at = (progress.epoch, progress.position + 1)
        return batch

    def _step(self, batch: Any) -> None:
        """One inner step: the schedule's lr, the loss, the backward pass and the optimizer's step."""
        progress = self.progress
        factor = self.lr_factor(progress.step)
        for group, lr in zip(self.opt.param_groups, self.base_lrs, strict=True):
            group["lr"] = lr * factor
        with self.precision.autocast():
            loss = self.task.loss(self.model, batch)
        self.comm.computed()  # (a virtual clock: the step's compute time, before its communication)
        self.opt.zero_grad(set_to_none=True)
        self.precision.backward_and_step(loss, self.opt)
        self.losses.add(loss)
        progress.step += 1
        progress.position += 1

    def _log(self, last: bool) -> float | None:
        """A record of the steps since the last one, with an evaluation, where one falls on this step (the last step's
        is logged with the final metrics); the train loss recorded, if any."""
        cfg, step = self.cfg, self.progress.step
        evaluate = bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0
        if not (step % cfg.logger.log_every == 0 or evaluate or last):
            return None
        record = self._record()
        if evaluate and not last:
            record.update(self._evaluate())
        if last or self.progress.divergence.stopped:
            self.last_record = record
        else:
            self.loggers.log(record)
        return record["train_loss"]

    def _ending(self, last: bool) -> Ending | None:
        """How the run ends on this step, if it does, after the checkpoint due here: a divergence the ranks saw
        (train.stop_on_divergence), a stop signal they agreed on (checked every train.signal_check_every steps), or
        the last step."""
        cfg, step = self.cfg, self.progress.step
        if self.progress.divergence.stopped:  # every rank logged the same loss: they stop together
            return Ending.DIVERGED
        check = cfg.train.signal_check_every and step % cfg.train.signal_check_every == 0
        self.stopped_by = preemption.agreed(self.local, self.device) if check else None
        if (cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0) or self.stopped_by:
            self._save()  # (one checkpoint when both fall on this step)
        if self.stopped_by:
            return Ending.INTERRUPTED if self.stopped_by == "SIGINT" else Ending.PREEMPTED
        return Ending.COMPLETED if last else None

    def _record(self) -> dict[str, Any]:
        """The metrics of the steps since the last record: train loss (mean over them and over ranks), lr, bytes."""
        progress, loss = self.progress, self.losses.mean()
        if progress.divergence.update(progress.step, loss):
            progress.divergence.stopped = self.cfg.train.stop_on_divergence
            if self.is_main:
                print(f"warning: {progress.divergence.message()}", file=sys.stderr, flush=True)
        record = {
            "step": progress.step,
            "epoch": progress.step / self.steps_per_epoch,
            "train_loss": loss,
            "lr": self.opt.param_groups[0]["lr"],
            "comm_bytes": self.comm.stats()["total"],
            "wall_time": progress.elapsed + time.time() - self.t0,
        }
        if self.comm.time() is not None:  # the simulator's virtual clock
            record["sim_time"] = self._latest_time()
        if self.precision.scaler is not None:
            record.update(loss_scale=self.precision.scale, skipped_steps=self.precision.skipped)
        return record

    def _finish(self, ending: Ending) -> dict[str, Any]:
        progress = self.progress
        if ending in (Ending.PREEMPTED, Ending.INTERRUPTED):
            self.loggers.close()
            return self._summarize(ending.value, signal=self.stopped_by, step=progress.step)
        if self.comm.agrees_between_rounds:  # (else the run ended on a round: every replica holds x_{T,0})
            self.opt.synchronize()  # the final exact average: every rank holds the averaged model
        final = self._evaluate(averaged=False)
        diverged = progress.divergence.record()
        if self.is_main:
            self.loggers.log({**self.last_record, "comm_bytes": self.comm.stats()["total"], **final})
            model = {name: tensor.cpu() for name, tensor in self.evaluator.evaluated.state_dict().items()}
            torch.save({"model": model}, self.run_dir / "final.pt")
        status = Ending.DIVERGED if diverged else ending
        summary = self._summarize(status.value, diverged=diverged, final=final)
        self.loggers.close()
        return summary

    def _summarize_failure(self, status: str, error: str, steps: int | None = None) -> None:
        """The record of a run that an error ended, as far as it can be written (not where the disk itself failed):
        the error that ended the run is the one raised; ``steps``, where known, those whose results were finite."""
        try:
            self._summarize(status, error=error, **({} if steps is None else {"steps": steps}))
        except OSError:
            pass

    def _summarize(self, status: str, **ending: Any) -> dict[str, Any]:
        """The run's record at its end (``status`` and what that ending adds), written by rank 0 to ``summary.json``
        whatever the ending; returned to every rank."""
        progress, stats = self.progress, self.comm.stats()
        steps = ending.pop("steps", progress.step)
        summary = {
            "status": status,
            **ending,
            "steps": steps,
            "epochs": steps / self.steps_per_epoch,
            "best": dict(progress.best),
            "comm_bytes": stats["total"],
            "comm_bytes_by_kind": stats,
            "wall_time": progress.elapsed + time.time() - self.t0,
            "world_size": self.world,
            "rank": self.local.rank,
            "algorithm": self.cfg.algorithm.name,
            "slowmo": self.cfg.slowmo.enabled,
            "main_metric": self.task.main_metric,
            **({"notes": self.task.notes} if self.task.notes else {}),
            "device": str(self.device),
            "precision": self.precision.name,
            "skipped_steps": self.precision.skipped,
            "threads": torch.get_num_threads(),
            "run_dir": str(self.run_dir),
            **self.comm.report(),
        }
        if self.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
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
