"""A teacher-student task that needs many steps: 64-dimensional Gaussian inputs labelled by a fixed random
two-layer ReLU network (10 classes), 16,384 training and 4,096 validation examples, generated offline from a
fixed seed. A student MLP of width 64 fits it only slowly, so the differences between optimizers that digits
hides (it is solved in a few epochs) have room to show."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from ..models import build_small
from ..train.config import Config
from .base import Task, classification

DIM, HIDDEN, CLASSES, TRAIN, VAL = 64, 128, 10, 16384, 4096


def build(cfg: Config) -> Task:
    g = torch.Generator().manual_seed(4321)  # the data set is the same for every run and seed
    w1, w2 = torch.randn(DIM, HIDDEN, generator=g) / DIM**0.5, torch.randn(HIDDEN, CLASSES, generator=g)
    x = torch.randn(TRAIN + VAL, DIM, generator=g)
    y = (torch.relu(x @ w1) @ w2).argmax(1)
    model = build_small(cfg.model.name, cfg.model.width, CLASSES, in_pixels=DIM)
    return classification(model, TensorDataset(x[:TRAIN], y[:TRAIN]), TensorDataset(x[TRAIN:], y[TRAIN:]),
                          cfg.data.batch_size, cfg.data.eval_batch_size, cfg.seed, cfg.task.label_smoothing)
