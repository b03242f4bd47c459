"""Small models for the embedded tasks (8x8 digits, 64-d teacher-student vectors): an MLP and a CNN."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .base import MODELS, ModelConfig


@dataclass
class SmallConfig(ModelConfig):
    width: int  # hidden width (the CNN's second convolution; its first has width / 2)


@MODELS.register("mlp", SmallConfig, label="MLP", takes=("images", "vectors"))
def mlp(cfg: SmallConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """Two hidden ReLU layers of ``width`` over the flattened input."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), cfg.width),
        nn.ReLU(),
        nn.Linear(cfg.width, cfg.width),
        nn.ReLU(),
        nn.Linear(cfg.width, num_classes),
    )


@MODELS.register("cnn", SmallConfig, label="CNN", takes=("images",))
def cnn(cfg: SmallConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """Two 3x3 convolutions with BatchNorm, pooled to 2x2, and a linear head."""
    width = cfg.width
    return nn.Sequential(
        nn.Conv2d(input_shape[0], width // 2, 3, padding=1),
        nn.BatchNorm2d(width // 2),
        nn.ReLU(),
        nn.Conv2d(width // 2, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )
