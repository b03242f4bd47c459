"""scikit-learn's handwritten digits (1,797 8x8 images, ships with scikit-learn: no download): the embedded task
for offline runs, the quickstart and the tests."""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from ..models import build_small
from ..train.config import Config
from .base import Task, classification


def build(cfg: Config) -> Task:
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))  # fixed split, any seed
    n_val = int(len(y) * cfg.data.val_fraction)
    val, train = order[:n_val], order[n_val:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    model = build_small(cfg.model.name, cfg.model.width)
    return classification(model, TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val]),
                          cfg.data.batch_size, cfg.data.eval_batch_size, cfg.seed, cfg.task.label_smoothing)
