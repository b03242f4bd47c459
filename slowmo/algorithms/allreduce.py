"""AllReduce (DP-SGD / AR-SGD, AR-Adam with Adam): the gradient mean over all ranks before every step."""

from __future__ import annotations

from ..flat import average_, gradients
from .base import ALGORITHMS, Algorithm, AlgorithmConfig


@ALGORITHMS.register("allreduce", AlgorithmConfig, label="AR-SGD")
class AllReduce(Algorithm):
    """g <- (1/m) sum_i g^i before every base step, so every rank takes the same step (data-parallel SGD).

    With ``procs_per_node`` the mean is still over all ranks (the node split changes nothing here)."""

    def before_step(self, step: int) -> None:
        average_(self.comm, gradients(self.params))
