"""Learning-rate schedules, as a function of the inner step: gamma_t = lr * factor(step)."""

from __future__ import annotations

import math
from typing import Callable

from .config import ScheduleConfig


def lr_factor(cfg: ScheduleConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The multiplier of ``optimizer.lr`` at inner step k (0-based).

    - constant: 1.
    - step: linear warm-up from ``warmup_init_lr`` over ``warmup_epochs``, then x ``gamma`` at each milestone
      epoch (the paper's images: 5-epoch warm-up, /10 at 100/150/175 on CIFAR-10, at 30/60/80 on ImageNet).
    - inverse_sqrt: linear warm-up over ``warmup_steps``, then sqrt(warmup_steps / k) (the Transformer's).
    """
    start = cfg.warmup_init_lr

    def warm(progress: float) -> float:
        return start + (1.0 - start) * progress

    if cfg.name == "constant":
        return lambda k: 1.0
    if cfg.name == "step":
        warmup = cfg.warmup_epochs * steps_per_epoch
        bounds = sorted(m * steps_per_epoch for m in cfg.milestones)

        def step(k: int) -> float:
            decay = cfg.gamma ** sum(k >= b for b in bounds)
            return warm(min(1.0, (k + 1) / warmup)) * decay if k < warmup else decay
        return step
    if cfg.name == "inverse_sqrt":
        warmup = max(1, cfg.warmup_steps)
        return lambda k: warm((k + 1) / warmup) if k + 1 < warmup else math.sqrt(warmup / (k + 1))
    raise ValueError(f"unknown schedule {cfg.name!r}; use constant, step or inverse_sqrt")
