"""Local SGD: every rank steps alone; the model is averaged every ``period`` inner steps, optionally after a warm-up
of ``warmup_steps`` data-parallel steps (post-local SGD)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..comm import Communicator
from ..flat import FlatParameters, GradientMean, average_
from ..registry import ConfigError, setting
from .base import ALGORITHMS, Algorithm, AlgorithmConfig


def _bad_warmup(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, int) or value < 0


@dataclass
class LocalSGDConfig(AlgorithmConfig):
    period: int | None = setting(minimum=1)  # H (configs/algorithm/localsgd.yaml ties it to slowmo.tau, as the paper)
    warmup_steps: int = 0  # K: the gradient mean over all ranks at inner steps k < K, then Local SGD (post-local SGD)

    elastic = True

    def not_elastic(self) -> str | None:
        if self.warmup_steps:
            return "the warm-up's gradient all-reduce comes at every inner step (set algorithm.warmup_steps=0)"
        return super().not_elastic()

    def not_in_shards(self) -> str | None:
        if self.warmup_steps:
            return (
                "the warm-up averages the gradients across replicas at every inner step (set algorithm.warmup_steps=0)"
            )
        return super().not_in_shards()

    def check(self) -> None:
        if _bad_warmup(self.warmup_steps):
            raise ConfigError(
                f"algorithm.warmup_steps must be an integer >= 0 (0: no warm-up), got {self.warmup_steps!r}"
            )


@ALGORITHMS.register("localsgd", LocalSGDConfig, label="Local SGD")
class LocalSGD(Algorithm):
    """x^i <- (1/m) sum_j x^j (parameters and floating-point buffers) after every ``period``-th inner step, after an
    optional warm-up of data-parallel steps: post-local SGD (Lin, Stich, Patel & Jaggi, "Don't Use Large Mini-Batches,
    Use Local SGD", ICLR 2020), as PyTorch's ``PostLocalSGDOptimizer``.

    With inner steps k = 0, 1, ..., H = ``period``, K = ``warmup_steps`` and m ranks:

    - warm-up, k < K: g^i <- (1/m) sum_j g^j over **all** m ranks before the base step (exactly AllReduce's mean, in
      buckets from the backward hooks, even with ``procs_per_node`` > 1), so every rank takes the same step; no
      parameter average (the replicas are equal);
    - then, k >= K: local steps (the node's gradient mean with ``procs_per_node`` > 1, none otherwise: no gradient
      all-reduce is sent any more) and x^i <- (1/m) sum_j x^j after step k when (k + 1) % H == 0.

    The averages stay on the grid of plain Local SGD (k + 1 = H, 2H, ...) and of SlowMo's outer steps ((k + 1) %
    tau == 0): the first one after the warm-up comes after 1 to H local steps, exactly H when H divides K (then
    every H local steps counted from K). K = 0 is plain Local SGD, unchanged (no hooks, no bytes).

    PyTorch's ``PeriodicModelAverager(period=H, warmup_steps=K)`` averages after step k when k >= K and
    (k - K) % H == 0 (k = K, K + H, ...): the same steps as ours when (K + 1) % H == 0 (e.g. H = 4 and K = 3, 7 or
    99; every K when H = 1). Then LocalSGD(period=H, warmup_steps=K) is
    ``PostLocalSGDOptimizer(SGD, PeriodicModelAverager(H, K))`` over DDP with ``post_localSGD_hook`` and
    ``PostLocalSGDState(start_localSGD_iter=K)`` (``post_local_gradient_allreduce=False``, or the node's group as
    ``subgroup`` with ``procs_per_node`` > 1). For any other K, ours equals PyTorch's run with the hook's
    ``start_localSGD_iter=K`` and the averager's ``warmup_steps=K + (-(K + 1) mod H)``, the first k >= K with
    (k + 1) % H == 0.

    Under SlowMo the outer step's exact average after step k with (k + 1) % tau == 0 replaces the Local SGD
    average of that step, and during the warm-up it is skipped (:attr:`replicas_equal`). The warm-up's state is
    the inner step counter alone (also kept in :meth:`state_dict`, as the backward hooks of the first step after
    a resume must know it).

    Args:
        period: H, inner steps between averages; None: never (under SlowMo, the outer step's exact average every
            tau steps is then the only one, as in the paper's presets where H = tau).
        procs_per_node: ranks per node (see :class:`~slowmo.algorithms.base.Algorithm`).
        warmup_steps: K, the data-parallel inner steps first (0: none).
    """

    def __init__(
        self, comm: Communicator, period: int | None = None, procs_per_node: int = 1, warmup_steps: int = 0
    ) -> None:
        if period is not None and (not isinstance(period, int) or period < 1):
            raise ValueError(f"LocalSGD period must be an integer >= 1 or None (never average), got {period!r}")
        if _bad_warmup(warmup_steps):
            raise ValueError(f"LocalSGD warmup_steps must be an integer >= 0 (0: no warm-up), got {warmup_steps!r}")
        super().__init__(comm, procs_per_node)
        self.period = period
        self.warmup_steps = warmup_steps
        self._next = 0  # the inner step k whose gradients the next backward pass brings
        self._warmup_mean: GradientMean | None = None  # the gradient mean over all ranks while k < K

    @property
    def replicas_equal(self) -> bool:  # type: ignore[override]
        """True while every step taken so far was a warm-up step: the replicas are then the same bits."""
        return self.warmup_steps > 0 and self._next <= self.warmup_steps

    def _warming_up(self) -> bool:
        return self._next < self.warmup_steps

    def bind(self, flat: FlatParameters, buffers: list[torch.Tensor]) -> None:
        super().bind(flat, buffers)
        if self.warmup_steps > 0:
            self._warmup_mean = flat.gradient_mean(self.comm, self.bucket_mb)
            self._switch()

    def _switch(self) -> None:
        """The hooks of the next backward pass: the mean over all ranks while warming up, the node's after."""
        warm = self._warming_up()
        if self._warmup_mean is not None:
            self._warmup_mean.enabled = warm
        if self._gradient_mean is not None:
            self._gradient_mean.enabled = not warm

    def wait_gradients(self) -> None:
        if self._warming_up():
            self._warmup_mean.wait()
        else:
            super().wait_gradients()

    def after_step(self, step: int, outer: bool) -> None:
        if self.warmup_steps > 0:
            self._next = step + 1
            self._switch()
        # When an exact average follows anyway (SlowMo's outer step), this one would be redundant.
        if self.period is not None and step >= self.warmup_steps and (step + 1) % self.period == 0 and not outer:
            self.comm.all_reduce(self.flat.values, "mean")
            average_(self.comm, self.buffers)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self._next} if self.warmup_steps > 0 else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.warmup_steps == 0:
            return
        if "step" not in state:
            raise ValueError(
                "the checkpoint's Local SGD state has no step counter (saved with warmup_steps=0); resume with "
                "warmup_steps=0 or start a new run directory"
            )
        self._next = int(state["step"])
        self._switch()
