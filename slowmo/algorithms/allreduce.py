"""AllReduce (DP-SGD / AR-SGD, AR-Adam with Adam): the gradient mean over all ranks before every step."""

from __future__ import annotations

from ..comm import Communicator
from .base import ALGORITHMS, Algorithm, AlgorithmConfig


@ALGORITHMS.register("allreduce", AlgorithmConfig, label="AR-SGD")
class AllReduce(Algorithm):
    """g <- (1/m) sum_i g^i before every base step, so every rank takes the same step (data-parallel SGD).

    The mean is taken in buckets started during the backward pass (:class:`~slowmo.flat.GradientMean`), as DDP
    does. With ``procs_per_node`` the mean is still over all ranks (the node split changes nothing here). Every rank
    holds the same parameters after every step, so SlowMo's exact average is skipped (``replicas_equal``)."""

    replicas_equal = True
    averages_gradients = True

    def gradient_group(self) -> Communicator:
        return self.comm
