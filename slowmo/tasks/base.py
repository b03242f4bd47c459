"""What a task provides to the shared loop: data, model, loss and metric."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

Batch = Any


@dataclass
class Task:
    """A task's pieces.

    ``train_batches(epoch, rank, world)`` gives this rank's batches of the epoch as lists of dataset indices (every
    rank gets as many, so collectives stay aligned; deterministic in seed and epoch, so a resumed run sees the
    same data). ``eval_sums(model, batch)`` returns a vector of sums that add up over batches and ranks;
    ``metrics(sums)`` turns the total into named numbers (``val_loss`` and ``val_acc`` or ``val_bleu``).
    """

    model: nn.Module
    train_set: Dataset
    val_set: Dataset
    collate: Callable[[list], Batch]
    train_batches: Callable[[int, int, int], list[list[int]]]
    val_batches: Callable[[int, int], list[list[int]]]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    eval_sums: Callable[[nn.Module, Batch], torch.Tensor]
    metrics: Callable[[torch.Tensor], dict[str, float]]
    main_metric: str = "val_acc"


def shuffled_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """Shuffle 0..n-1 with (seed, epoch), give rank r every world-th index from r, cut into full batches."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    mine = order[rank:n - n % world:world]
    return [mine[i:i + batch_size] for i in range(0, len(mine) - batch_size + 1, batch_size)]


def sharded_batches(n: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """Evaluation: rank r takes indices r, r + world, ..., in batches (the last one may be short)."""
    mine = list(range(rank, n, world))
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def classification(model: nn.Module, train_set: Dataset, val_set: Dataset, batch_size: int, eval_batch_size: int,
                   seed: int, label_smoothing: float = 0.0, topk: int = 1) -> Task:
    """A Task for image classification: cross-entropy, top-1 (and top-k) accuracy."""

    def collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])

    def loss(net: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(net(x), y, label_smoothing=label_smoothing)

    def eval_sums(net: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        logits = net(x).float()
        top = logits.topk(min(topk, logits.size(1)), dim=1).indices
        sums = [nn.functional.cross_entropy(logits, y, reduction="sum"), (top[:, 0] == y).sum(),
                (top == y[:, None]).any(1).sum(), y.new_tensor(len(y))]
        return torch.stack([value.to(torch.float64) for value in sums])  # on the batch's device: no host sync

    def metrics(sums: torch.Tensor) -> dict[str, float]:
        loss_sum, correct, correct_k, count = sums.tolist()
        out = {"val_loss": loss_sum / count, "val_acc": 100.0 * correct / count}
        if topk > 1:
            out[f"val_acc_top{topk}"] = 100.0 * correct_k / count
        return out

    return Task(model, train_set, val_set, collate,
                lambda epoch, rank, world: shuffled_batches(len(train_set), batch_size, seed, epoch, rank, world),
                lambda rank, world: sharded_batches(len(val_set), eval_batch_size, rank, world),
                loss, eval_sums, metrics)
