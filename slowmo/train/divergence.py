"""Divergence: a run whose training loss, after having fallen to half its starting level or less, climbs back to that
level has diverged (e.g. Local SGD at too large an lr: 94 % validation accuracy, then the loss back at ln 10 and 7 %).
A NaN loss stops a run at once (:class:`~slowmo.train.NonFiniteLoss`); this catches the finite blow-up that a NaN
check cannot see.

The levels are the logged train losses (each the mean over ``logger.log_every`` steps and over the ranks, so every rank
sees the same numbers and decides alike): the start is the first of them. A diverged run is warned about once, marked in
``summary.json`` (``"status": "diverged"`` and a ``"diverged"`` record), and with ``train.stop_on_divergence=true``
stopped at that point.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Divergence:
    start: float | None = None  # the first logged train loss
    best: float = math.inf  # the lowest logged train loss so far
    best_step: int = 0
    step: int | None = None  # the first step logged at or above ``start`` after ``best`` had halved it
    loss: float | None = None  # the train loss logged there
    stopped: bool = False  # the run ended there (train.stop_on_divergence)

    def update(self, step: int, loss: float) -> bool:
        """Take the train loss logged at ``step``; True when this record is the one at which the run diverged."""
        if self.start is None:
            self.start = loss
        if loss < self.best:
            self.best, self.best_step = loss, step
        if self.step is None and self.best <= self.start / 2 and loss >= self.start:
            self.step, self.loss = step, loss
            return True
        return False

    def message(self) -> str:
        return (
            f"the run diverged: its train loss is back at its starting level ({self.start:.4g}) or above, "
            f"{self.loss:.4g} at step {self.step}, after having fallen to {self.best:.4g} at step {self.best_step}; "
            "lower optimizer.lr (train.stop_on_divergence=true ends such a run there)"
        )

    def record(self) -> dict[str, Any] | None:
        """What ``summary.json`` says of it: None, or where and how the run diverged."""
        return asdict(self) if self.step is not None else None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
