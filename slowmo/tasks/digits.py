"""scikit-learn's handwritten digits (1,797 8x8 images, ships with scikit-learn: no download): the embedded task
for offline runs, the quickstart and the tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from ..models import ModelConfig, build_model
from .base import TASKS, ImageData, Task, TaskConfig, TaskContext, classification


@dataclass
class DigitsData(ImageData):
    val_fraction: float  # held-out share (a fixed split, the same for every seed)


@TASKS.register(
    "digits",
    TaskConfig,
    data=DigitsData,
    label="digits",
    inputs="images",
    needs="a model for 8x8 images",
    imports=("sklearn.datasets",),
    defaults_checked=True,
)
def build(task: TaskConfig, data: DigitsData, model: ModelConfig, ctx: TaskContext) -> Task:
    from sklearn.datasets import load_digits  # here: scikit-learn takes seconds to import, a config check none

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))  # fixed split, any seed
    n_val = int(len(y) * data.val_fraction)
    val, train = order[:n_val], order[n_val:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    net = build_model(model, num_classes=10, input_shape=(1, 8, 8))
    return classification(
        net, TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]), data, ctx, task.label_smoothing
    )
