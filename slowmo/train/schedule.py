"""Learning-rate schedules, registered by name in :data:`SCHEDULES` (``configs/schedule/<name>.yaml``): a function
of the inner step k, gamma_k = optimizer.lr * factor(k)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ..registry import ConfigError, Registry, setting

SCHEDULES = Registry("schedule", "slowmo.train.schedule")


@dataclass
class ConstantConfig:
    name: str


def _check_warmup_factor(value: float) -> None:
    if not 0 <= value <= 1:
        raise ConfigError(f"schedule.warmup_init_lr must be in [0, 1] (a factor of optimizer.lr), got {value}")


@dataclass
class StepConfig:
    name: str
    warmup_epochs: float = setting(minimum=0)  # linear warm-up, in epochs
    warmup_init_lr: float  # factor at step 0 of the warm-up
    milestones: list[float]  # epochs at which the lr is multiplied by gamma
    gamma: float  # the lr's factor at each milestone (0.1: the paper's /10)

    def check(self) -> None:
        _check_warmup_factor(self.warmup_init_lr)
        if any(m < 0 for m in self.milestones):
            raise ConfigError(f"schedule.milestones must be epochs >= 0, got {self.milestones}")
        if not self.gamma > 0:
            raise ConfigError(f"schedule.gamma must be > 0 (the lr's factor at each milestone), got {self.gamma}")


@dataclass
class InverseSqrtConfig:
    name: str
    warmup_steps: int = setting(minimum=0)  # linear warm-up, in inner steps
    warmup_init_lr: float  # factor at step 0 of the warm-up

    def check(self) -> None:
        _check_warmup_factor(self.warmup_init_lr)


def _warm(start: float, progress: float) -> float:
    return start + (1.0 - start) * progress


@SCHEDULES.register("constant", ConstantConfig)
def constant(cfg: ConstantConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """factor(k) = 1."""
    return lambda k: 1.0


@SCHEDULES.register("step", StepConfig)
def step(cfg: StepConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Linear warm-up from ``warmup_init_lr`` over ``warmup_epochs``, then x ``gamma`` at each milestone epoch (the
    paper's images: 5-epoch warm-up, /10 at 100/150/175 on CIFAR-10, at 30/60/80 on ImageNet; Goyal et al.)."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    bounds = sorted(m * steps_per_epoch for m in cfg.milestones)

    def factor(k: int) -> float:
        decay = cfg.gamma ** sum(k >= b for b in bounds)
        return _warm(cfg.warmup_init_lr, min(1.0, (k + 1) / warmup)) * decay if k < warmup else decay

    return factor


@SCHEDULES.register("inverse_sqrt", InverseSqrtConfig)
def inverse_sqrt(cfg: InverseSqrtConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_steps``, then sqrt(warmup_steps / k) (the Transformer's, fairseq's)."""
    warmup = max(1, cfg.warmup_steps)
    return lambda k: _warm(cfg.warmup_init_lr, (k + 1) / warmup) if k + 1 < warmup else math.sqrt(warmup / (k + 1))
