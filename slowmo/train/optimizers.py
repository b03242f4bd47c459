"""Base optimizers, registered by name in :data:`OPTIMIZERS` (``configs/optimizer/<name>.yaml``): torch's SGD
(with Nesterov momentum, the paper's image runs), Adam (the WMT runs) and AdamW (DiLoCo's inner optimizer)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..registry import ConfigError, Registry

OPTIMIZERS = Registry("optimizer", "slowmo.train.optimizers")


def _check_common(lr: float, weight_decay: float) -> None:
    if not lr > 0:
        raise ConfigError(f"optimizer.lr must be > 0 (the base learning rate gamma, before the schedule), got {lr}")
    if not weight_decay >= 0:
        raise ConfigError(f"optimizer.weight_decay must be >= 0 (0: none), got {weight_decay}")


@dataclass
class SGDConfig:
    name: str
    lr: float  # gamma before the schedule's factor
    momentum: float  # heavy-ball momentum mu in [0, 1)
    nesterov: bool  # Nesterov's form (needs momentum > 0)
    weight_decay: float  # L2 penalty added to the gradient

    def check(self) -> None:
        _check_common(self.lr, self.weight_decay)
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optimizer.momentum must be in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("optimizer.nesterov=true needs optimizer.momentum > 0 (e.g. 0.9), or set nesterov=false")


@dataclass
class AdamConfig:
    name: str
    lr: float  # gamma before the schedule's factor
    betas: list[float]  # [beta1, beta2]: the moments' decay rates, each in [0, 1)
    eps: float  # added to the second moment's root
    weight_decay: float  # Adam: L2 penalty on the gradient; AdamW: decoupled decay

    def check(self) -> None:
        _check_common(self.lr, self.weight_decay)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got {self.betas}")
        if not self.eps > 0:
            raise ConfigError(f"optimizer.eps must be > 0, got {self.eps}")


@OPTIMIZERS.register("sgd", SGDConfig, label="SGD")
def sgd(params: Iterable[torch.Tensor], cfg: SGDConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov and cfg.momentum > 0,
        weight_decay=cfg.weight_decay,
    )


@OPTIMIZERS.register("adam", AdamConfig, label="Adam")
def adam(params: Iterable[torch.Tensor], cfg: AdamConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


@OPTIMIZERS.register("adamw", AdamConfig, label="AdamW")
def adamw(params: Iterable[torch.Tensor], cfg: AdamConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
