"""Evaluation: the task's metrics of the model averaged over the ranks, on every evaluation split (``val_*`` and, where
the task has one, ``test_*``), each rank scoring its shard (:func:`~slowmo.tasks.base.sharded_batches` of
``data.eval_batch_size``) and the sums added over the ranks; and the best of the metrics so far."""

from __future__ import annotations

import copy
from typing import Any

import torch
from tqdm import tqdm

from ..comm import Communicator
from ..tasks import Task
from ..tasks.base import sharded_batches
from . import data
from .precision import Precision

PROGRESS_AFTER_S = 2.0  # an evaluation shows its progress once it has taken this long (beam search does)


class Evaluator:
    """This rank's loaders of the evaluation splits, and a copy of the model to evaluate the average in."""

    def __init__(
        self,
        task: Task,
        model: torch.nn.Module,
        loading: Any,
        comm: Communicator,
        device: torch.device,
        channels_last: bool,
        show: bool,
    ) -> None:
        """``loading``: the ``data`` config section (workers, eval_batch_size); ``show``: a progress bar when slow."""
        self.task, self.comm, self.device, self.channels_last, self.show = task, comm, device, channels_last, show
        self.model = copy.deepcopy(model)  # (of the whole model: built before any sharding)
        self.evaluated = model  # the model the last metrics are of
        self.loaders = {  # split -> (its dataset, this rank's loader of it)
            split: (
                dataset,
                data.loader(
                    dataset,
                    sharded_batches(len(dataset), loading.eval_batch_size, comm.rank, comm.world_size),
                    task.collate,
                    loading.num_workers,
                    loading.prefetch_factor,
                    device.type == "cuda",
                ),
            )
            for split, dataset in (("val", task.val_set), ("test", task.test_set))
            if dataset is not None
        }

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, precision: Precision, values: list[torch.Tensor] | None) -> dict:
        """The metrics of ``model`` or, given ``values`` (whole parameters and floating buffers: the model averaged
        over the ranks, or a sharded model's own), of those, in this evaluator's copy; the training state is left
        untouched."""
        if values is not None:
            own = list(self.model.parameters()) + [b for b in self.model.buffers() if b.is_floating_point()]
            for target, value in zip(own, values, strict=True):
                target.detach().copy_(value)
            model = self.model
        self.evaluated = model
        was_training = model.training
        model.eval()
        metrics: dict[str, float] = {}
        for split, (dataset, loader) in self.loaders.items():
            sums = None
            batches = tqdm(  # shown only for an evaluation that takes seconds (beam search)
                data.on_device(loader, self.device, self.channels_last),
                total=len(loader),
                desc=f"evaluating {split}",
                leave=False,
                delay=PROGRESS_AFTER_S,
                disable=not self.show,
                dynamic_ncols=True,
            )
            with precision.autocast():
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

    def close(self) -> None:
        for _, loader in self.loaders.values():
            data.close(loader)


def track_best(best: dict[str, float], metrics: dict[str, float], main: str) -> dict[str, float]:
    """Update ``best`` (in place) with ``metrics``: the best value of every validation metric so far (lowest for a
    loss, highest otherwise), and the test metrics of the evaluation with the best ``main`` metric (the test split
    chooses nothing). Returns ``metrics``."""
    if main in metrics and (
        main not in best or (metrics[main] < best[main] if main.endswith("loss") else metrics[main] > best[main])
    ):
        best.update({key: value for key, value in metrics.items() if key.startswith("test_")})
    for key, value in metrics.items():
        if not key.startswith("test_"):
            better = min if key.endswith("loss") else max
            best[key] = better(best.get(key, value), value)
    return metrics
