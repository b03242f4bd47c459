"""Base optimizers, registered by name in :data:`OPTIMIZERS` (``configs/optimizer/<name>.yaml``): torch's SGD
(with Nesterov momentum, the paper's image runs), Adam (the WMT runs) and AdamW (DiLoCo's inner optimizer)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..registry import Registry

OPTIMIZERS = Registry("optimizer", "slowmo.train.optimizers")


@dataclass
class SGDConfig:
    name: str
    lr: float  # gamma before the schedule's factor
    momentum: float
    nesterov: bool
    weight_decay: float


@dataclass
class AdamConfig:
    name: str
    lr: float
    betas: list[float]
    eps: float
    weight_decay: float


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
