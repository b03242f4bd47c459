"""Small models for the embedded tasks (8x8 digits, 64-d teacher-student vectors, MNIST-1D signals): an MLP, a CNN
and MNIST-1D's 1D CNN."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..registry import setting
from .base import MODELS, ModelConfig


@dataclass
class SmallConfig(ModelConfig):
    # hidden width (the CNN's second convolution, its first has width / 2; cnn1d: every convolution)
    width: int = setting(minimum=2)


@MODELS.register("mlp", SmallConfig, label="MLP", takes=("images", "vectors", "signals"))
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


@MODELS.register("cnn1d", SmallConfig, label="1D CNN", takes=("signals",))
def cnn1d(cfg: SmallConfig, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """MNIST-1D's CNN (Greydanus & Kobak): three 1D convolutions of ``width`` channels (kernel 5, then 3 and 3; stride
    2, padding 1; ReLU) and a linear head over the flattened features (40 samples -> 19 -> 10 -> 5 positions)."""
    channels, length = input_shape
    for kernel in (5, 3, 3):
        length = (length + 2 - kernel) // 2 + 1
    width = cfg.width
    return nn.Sequential(
        nn.Conv1d(channels, width, 5, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(width, width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv1d(width, width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(width * length, num_classes),
    )
