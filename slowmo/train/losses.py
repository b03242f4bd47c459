"""The training loss between two records: this rank's losses stay on its device and come to the host together (one
sync per read); a non-finite one stops every rank before any checkpoint of it is written; a record takes their mean
over the steps and the ranks."""

from __future__ import annotations

import math

import torch

from ..comm import Communicator
from .progress import Progress


class NonFiniteLoss(FloatingPointError):
    """The loss (or, at a checkpoint, a parameter) became NaN or infinite; the last good checkpoint is kept.
    ``finite_steps``: the steps before the one that made it so (the run's record counts these)."""

    def __init__(self, message: str, finite_steps: int) -> None:
        super().__init__(message)
        self.finite_steps = finite_steps


class Losses:
    """This rank's losses since the last read, folded into ``progress`` (its sum and count) by :meth:`read`."""

    def __init__(self, comm: Communicator, progress: Progress, device: torch.device) -> None:
        self.comm, self.progress, self.device = comm, progress, device
        self.pending: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor) -> None:
        self.pending.append(loss.detach())

    def clear(self) -> None:
        self.pending.clear()

    def read(self) -> None:
        """Bring the pending losses to the host (one sync); if any rank's is not finite, every rank stops (the ranks
        agree with one all-gather, so that none goes on to write a checkpoint of that step)."""
        if not self.pending:
            return
        values = torch.stack(self.pending).tolist()
        first = self.progress.step - len(values)
        bad = next(((first + i, v) for i, v in enumerate(values) if not math.isfinite(v)), None)
        mine = torch.tensor([-1.0, 0.0] if bad is None else [float(bad[0]), bad[1]], dtype=torch.float64)
        everyone = torch.empty(2 * self.comm.world_size, dtype=torch.float64, device=self.device)
        with self.comm.uncounted():
            self.comm.all_gather(everyone, mine.to(self.device))
        for rank, (step, value) in enumerate(everyone.view(self.comm.world_size, 2).tolist()):
            if step >= 0:
                raise NonFiniteLoss(
                    f"rank {rank}: loss is {value} at step {int(step)}; stopped before any "
                    "checkpoint of it was written (lower optimizer.lr or check the data)",
                    finite_steps=int(step),
                )
        self.pending.clear()
        self.progress.loss_sum += sum(values)
        self.progress.loss_count += len(values)

    def mean(self) -> float:
        """The mean loss over the steps since the last record and over the ranks; the next record starts afresh."""
        self.read()
        progress = self.progress
        mean = torch.tensor([progress.loss_sum / progress.loss_count], dtype=torch.float64, device=self.device)
        with self.comm.uncounted():
            loss = self.comm.all_reduce(mean, "mean").item()
        progress.loss_sum, progress.loss_count = 0.0, 0
        return loss
