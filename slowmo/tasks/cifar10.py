"""CIFAR-10 through torchvision's ``CIFAR10`` loader (the python-pickle batches under ``data.root``), CIFAR
ResNet, standard augmentation (random crop with 4-pixel padding, horizontal flip), top-1 accuracy."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torchvision
import torchvision.transforms as T

from ..models import ModelConfig, build_model
from ..registry import ConfigError
from .base import TASKS, ImageData, Task, TaskConfig, TaskContext, classification

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class CIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's loader; with ``verify_checksums=False`` only the MD5 check is skipped (files written by tests
    or converted by hand), the reading is torchvision's own."""

    def __init__(self, root: str, train: bool, transform, download: bool, verify_checksums: bool) -> None:
        if not verify_checksums:
            self.train_list = [[name, None] for name, _ in self.train_list]
            self.test_list = [[name, None] for name, _ in self.test_list]
            self.meta = dict(self.meta, md5=None)
        super().__init__(root, train=train, transform=transform, download=download)


@dataclass
class CIFAR10Data(ImageData):
    root: str | None  # the directory holding cifar-10-batches-py/
    augment: bool  # random crop (4-pixel padding) and horizontal flip
    download: bool  # fetch the batches when online
    verify_checksums: bool  # torchvision's MD5 check of the batch files


@TASKS.register("cifar10", TaskConfig, data=CIFAR10Data, label="CIFAR-10", inputs="images", needs="an image model")
def build(task: TaskConfig, data: CIFAR10Data, model: ModelConfig, ctx: TaskContext) -> Task:
    if data.root is None:
        raise ConfigError(
            "task cifar10 needs data.root: the directory holding cifar-10-batches-py/ "
            "(add data.download=true to fetch it when online)"
        )
    root = Path(data.root)
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing and not data.download:
        raise ConfigError(
            f"CIFAR-10 files missing under {folder}: {', '.join(missing)}; point data.root at the "
            "directory holding cifar-10-batches-py/ or add data.download=true"
        )
    normalize = [T.ToTensor(), T.Normalize(MEAN, STD)]
    augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if data.augment else []
    train = CIFAR10(str(root), True, T.Compose(augment + normalize), data.download, data.verify_checksums)
    val = CIFAR10(str(root), False, T.Compose(normalize), False, data.verify_checksums)
    net = build_model(model, num_classes=10, input_shape=(3, 32, 32))
    return classification(net, train, val, data, ctx, task.label_smoothing)
