"""Local SGD: every rank steps alone; the model is averaged every ``period`` inner steps."""

from __future__ import annotations

from dataclasses import dataclass

from ..comm import Communicator
from ..flat import average_
from .base import ALGORITHMS, Algorithm, AlgorithmConfig


@dataclass
class LocalSGDConfig(AlgorithmConfig):
    period: int | None  # H (configs/algorithm/localsgd.yaml ties it to slowmo.tau, as the paper's presets)


@ALGORITHMS.register("localsgd", LocalSGDConfig, label="Local SGD")
class LocalSGD(Algorithm):
    """x^i <- (1/m) sum_j x^j (parameters and floating-point buffers) after every ``period``-th inner step.

    Args:
        period: H, inner steps between averages; None: never (under SlowMo, the outer step's exact average every
            tau steps is then the only one, as in the paper's presets where H = tau).
    """

    def __init__(self, comm: Communicator, period: int | None = None, procs_per_node: int = 1) -> None:
        if period is not None and (not isinstance(period, int) or period < 1):
            raise ValueError(f"LocalSGD period must be an integer >= 1 or None (never average), got {period!r}")
        super().__init__(comm, procs_per_node)
        self.period = period

    def after_step(self, step: int, outer: bool) -> None:
        # When an exact average follows anyway (SlowMo's outer step), this one would be redundant.
        if self.period is not None and (step + 1) % self.period == 0 and not outer:
            self.comm.all_reduce(self.flat.values, "mean")
            average_(self.comm, self.buffers)
