"""A run's progress: where it is (step, epoch, position in the epoch), what it has seen since the last record, the best
metrics, the divergence watch and its W&B id; saved in every checkpoint and loaded from it here, in one place."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, fields
from typing import Any

from .divergence import Divergence


@dataclass
class Progress:
    step: int = 0  # inner steps taken (the loop's; fp16's skipped steps included)
    epoch: int = 0
    position: int = 0  # batches of this epoch taken
    elapsed: float = 0.0  # seconds of training before this attempt
    loss_sum: float = 0.0  # this rank's losses since the last record
    loss_count: int = 0
    best: dict[str, float] = field(default_factory=dict)  # the best of each validation metric; test_* at the best one
    divergence: Divergence = field(default_factory=Divergence)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])  # names the run in W&B; kept by a resume

    def state_dict(self) -> dict[str, Any]:
        """The fields, flat, as a checkpoint holds them."""
        state = {f.name: getattr(self, f.name) for f in fields(self)}
        state["divergence"] = self.divergence.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            if f.name == "divergence":
                self.divergence.load_state_dict(state.get("divergence", {}))  # (absent from checkpoints before it)
            elif f.name in state:
                setattr(self, f.name, state[f.name])
