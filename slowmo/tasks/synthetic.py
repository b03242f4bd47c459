"""A teacher-student task that needs many steps: 64-dimensional Gaussian inputs labelled by a fixed random
two-layer ReLU network (10 classes), 16,384 training and 4,096 validation examples, generated offline from a
fixed seed. A student MLP of width 64 fits it only slowly, so the differences between optimizers that digits
hides (it is solved in a few epochs) have room to show."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from ..models import ModelConfig, build_model
from .base import TASKS, ImageData, Task, TaskConfig, TaskContext, classification

DIM, HIDDEN, CLASSES, TRAIN, VAL = 64, 128, 10, 16384, 4096


@TASKS.register(
    "synthetic",
    TaskConfig,
    data=ImageData,
    label="teacher-student",
    inputs="vectors",
    needs="a model for vectors",
    defaults_checked=True,
)
def build(task: TaskConfig, data: ImageData, model: ModelConfig, ctx: TaskContext) -> Task:
    g = torch.Generator().manual_seed(4321)  # the data set is the same for every run and seed
    w1, w2 = torch.randn(DIM, HIDDEN, generator=g) / DIM**0.5, torch.randn(HIDDEN, CLASSES, generator=g)
    x = torch.randn(TRAIN + VAL, DIM, generator=g)
    y = (torch.relu(x @ w1) @ w2).argmax(1)
    net = build_model(model, num_classes=CLASSES, input_shape=(DIM,))
    return classification(
        net, TensorDataset(x[:TRAIN], y[:TRAIN]), TensorDataset(x[TRAIN:], y[TRAIN:]), data, ctx, task.label_smoothing
    )
