"""MNIST-1D (Greydanus & Kobak, 2024; PyPI ``mnist1d``): 40-sample 1D signals of the ten digit templates, shifted,
scaled, sheared and noised, generated offline by ``mnist1d.data.make_dataset`` from a fixed seed. Small enough for
2 CPU cores, hard enough that a CNN does not saturate and that optimizers differ in test accuracy (an MLP reaches
about 70 %, a CNN about 95 % in the dataset's paper), which digits (97 % for everything) cannot show.

Splits: mnist1d's own train/test split (``train_split`` = 0.8 of ``num_samples``); the last ``val_fraction`` of its
training part is the validation split that tuning may look at, and its test part is the held-out test split, scored
as ``test_*`` and never used for a choice. The data are the same for every run seed (``data.generator_seed``).
A dataset is generated once per machine and read from ``$XDG_CACHE_HOME/slowmo/mnist1d`` (``~/.cache``) after.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from ..models import ModelConfig, build_model
from ..registry import ConfigError
from .base import TASKS, ImageData, Task, TaskConfig, TaskContext, classification


@dataclass
class MNIST1DData(ImageData):
    num_samples: int  # signals generated, train + test (mnist1d's default: 5000)
    val_fraction: float  # the end of mnist1d's training part held out for validation
    generator_seed: int  # mnist1d's generation seed (its default: 42); the same data for every run seed

    def check(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        if self.num_samples < 50:
            raise ConfigError(f"data.num_samples={self.num_samples} is too few for 10 classes; use at least 50")
        if not 0 <= self.generator_seed < 2**32:
            raise ConfigError(f"data.generator_seed={self.generator_seed} must be in [0, 2**32) (numpy's seeds)")


CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "slowmo" / "mnist1d"


@functools.cache
def generate(num_samples: int, seed: int) -> dict[str, torch.Tensor]:
    """mnist1d's generator with its default arguments but ``num_samples`` and ``seed``: generated once per machine
    (seconds of scipy interpolation), then read from ``CACHE`` (milliseconds), and kept in memory for the simulated
    ranks and later runs of a process."""
    path = CACHE / f"{num_samples}-{seed}-mnist1d{version('mnist1d')}.pt"
    if path.is_file():
        return torch.load(path)
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    d = make_dataset(args)
    tensors = {
        "x": torch.tensor(d["x"], dtype=torch.float32).unsqueeze(1),  # (N, 1, 40): one channel
        "y": torch.tensor(d["y"]),
        "x_test": torch.tensor(d["x_test"], dtype=torch.float32).unsqueeze(1),
        "y_test": torch.tensor(d["y_test"]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")  # written whole, then renamed: readers never see a part
    torch.save(tensors, partial)
    os.replace(partial, path)
    return tensors


@TASKS.register(
    "mnist1d",
    TaskConfig,
    data=MNIST1DData,
    label="MNIST-1D",
    inputs="signals",
    needs="a model for 1D signals",
    defaults_checked=True,
)  # no heavy import to preload: mnist1d's generator (scipy) runs once per machine, then the cache is read
def build(task: TaskConfig, data: MNIST1DData, model: ModelConfig, ctx: TaskContext) -> Task:
    d = generate(data.num_samples, data.generator_seed)
    n_val = int(len(d["y"]) * data.val_fraction)
    x, y = d["x"], d["y"]
    net = build_model(model, num_classes=10, input_shape=tuple(x.shape[1:]))
    return classification(
        net,
        TensorDataset(x[:-n_val], y[:-n_val]),
        TensorDataset(x[-n_val:], y[-n_val:]),
        data,
        ctx,
        task.label_smoothing,
        test_set=TensorDataset(d["x_test"], d["y_test"]),
    )
