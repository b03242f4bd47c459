"""Small models for 8x8 digits: an MLP and a CNN."""

from __future__ import annotations

from torch import nn


def build_small(name: str, width: int, num_classes: int = 10, in_pixels: int = 64) -> nn.Module:
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(in_pixels, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                             nn.Linear(width, num_classes))
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(1, width // 2, 3, padding=1), nn.BatchNorm2d(width // 2), nn.ReLU(),
                             nn.Conv2d(width // 2, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, num_classes))
    raise ValueError(f"unknown small model {name!r}; use mlp or cnn")
