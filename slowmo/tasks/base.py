"""What a task provides to the shared loop (data, model, loss, metric), and the task registry.

A task registers its name, its two config sections (``task`` and ``data``, both in ``configs/task/<name>.yaml``),
what inputs it gives a model (images, vectors, signals or tokens) and its builder, which receives its own sections, the
model's section and a :class:`TaskContext` (never the whole run config):

    @TASKS.register("<name>", TaskConfig, data=MyData, inputs="images", needs="an image model")
    def build(task: TaskConfig, data: MyData, model: ModelConfig, ctx: TaskContext) -> Task: ...

A task imports its heavy libraries (torchvision, scikit-learn, sacreBLEU) inside its builder, so that checking a
config takes no seconds of them, and names them in ``imports=(...)``: the local launcher's fork server imports them
once for all ranks (:func:`slowmo.comm.spawn`). ``defaults_checked=True`` says that its defaults train with every
outer step and base algorithm (``benchmarks/defaults.py`` runs those tasks); a run of another task with an outer
step and no experiment preset says once that its defaults are generic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..registry import Registry, setting

TASKS = Registry("task", "slowmo.tasks")
Batch = Any


@dataclass
class TaskConfig:
    """The ``task`` section every task has."""

    name: str
    label_smoothing: float  # cross-entropy's (fairseq's label_smoothed_cross_entropy: 0.1 for WMT)


@dataclass
class LoaderConfig:
    """The ``data`` keys every task has: how its batches are loaded (see :mod:`slowmo.train.data`)."""

    eval_batch_size: int = setting(run_control=True, minimum=1)  # examples per evaluation batch
    num_workers: int = setting(run_control=True, minimum=0, why="0 loads batches on the training thread")
    prefetch_factor: int = setting(run_control=True, minimum=1, why="batches each worker loads ahead")


@dataclass
class ImageData(LoaderConfig):
    batch_size: int = setting(minimum=1)  # images per rank per step


@dataclass(frozen=True)
class TaskContext:
    """What a task knows of the run: this rank, the number of ranks, the seed, and a directory all ranks share
    (rank 0 builds its task first, so files it writes there are ready for the others)."""

    rank: int
    world_size: int
    seed: int
    shared_dir: Path


@dataclass
class Task:
    """A task's pieces.

    ``train_batches(epoch)`` gives this rank's batches of the epoch as lists of dataset indices (every rank gets as
    many, so collectives stay aligned; deterministic in seed and epoch, so a resumed run sees the same data). The
    loop evaluates every split the same way (:func:`sharded_batches` of ``data.eval_batch_size``):
    ``eval_sums(model, batch)`` returns a vector of sums that add up over batches and ranks; ``metrics(sums)`` turns
    the total into named numbers, among them ``main_metric`` (the one tables and figures show). A task with a
    held-out ``test_set`` has it scored with the same ``eval_sums``/``metrics`` at every evaluation, its metrics
    named ``test_*``; no choice of the loop looks at them. ``notes`` say how the metrics were computed (e.g. sacreBLEU's
    signature); they go into ``summary.json``.
    """

    model: nn.Module
    train_set: Dataset
    val_set: Dataset
    collate: Callable[[list], Batch]
    train_batches: Callable[[int], list[list[int]]]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    eval_sums: Callable[[nn.Module, Batch], torch.Tensor]
    metrics: Callable[[torch.Tensor], dict[str, float]]
    main_metric: str
    test_set: Dataset | None = None
    notes: dict[str, str] = field(default_factory=dict)


def shuffled_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """Shuffle 0..n-1 with (seed, epoch), give rank r every world-th index from r, cut into full batches."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    mine = order[rank : n - n % world : world]
    return [mine[i : i + batch_size] for i in range(0, len(mine) - batch_size + 1, batch_size)]


def sharded_batches(n: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Evaluation (every split, by the loop): rank r takes indices r, r + world, ..., in batches (the last one may be
    short)."""
    mine = list(range(rank, n, world))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def classification(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    data: ImageData,
    ctx: TaskContext,
    label_smoothing: float = 0.0,
    topk: int = 1,
    test_set: Dataset | None = None,
) -> Task:
    """A Task for classification (images, vectors, signals): cross-entropy, top-1 (and top-k) accuracy; with a
    ``test_set``, the same metrics on it as ``test_*``."""

    def collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])

    def loss(net: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(net(x), y, label_smoothing=label_smoothing)

    def eval_sums(net: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        logits = net(x).float()
        top = logits.topk(min(topk, logits.size(1)), dim=1).indices
        sums = [
            nn.functional.cross_entropy(logits, y, reduction="sum"),
            (top[:, 0] == y).sum(),
            (top == y[:, None]).any(1).sum(),
            y.new_tensor(len(y)),
        ]
        return torch.stack([value.to(torch.float64) for value in sums])  # on the batch's device: no host sync

    def metrics(sums: torch.Tensor) -> dict[str, float]:
        loss_sum, correct, correct_k, count = sums.tolist()
        out = {"val_loss": loss_sum / count, "val_acc": 100.0 * correct / count}
        if topk > 1:
            out[f"val_acc_top{topk}"] = 100.0 * correct_k / count
        return out

    def train_batches(epoch: int) -> list[list[int]]:
        return shuffled_batches(len(train_set), data.batch_size, ctx.seed, epoch, ctx.rank, ctx.world_size)

    return Task(
        model,
        train_set,
        val_set,
        collate,
        train_batches,
        loss,
        eval_sums,
        metrics,
        main_metric="val_acc",
        test_set=test_set,
    )
