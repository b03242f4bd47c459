"""CIFAR-10 through torchvision's ``CIFAR10`` loader (the python-pickle batches under ``data.root``), CIFAR
ResNet, standard augmentation (random crop with 4-pixel padding, horizontal flip), top-1 accuracy."""

from __future__ import annotations

from pathlib import Path

import torchvision
import torchvision.transforms as T

from ..models import build_resnet
from ..train.config import Config, ConfigError
from .base import Task, classification

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


def build(cfg: Config) -> Task:
    if cfg.data.root is None:
        raise ConfigError("task cifar10 needs data.root: the directory holding cifar-10-batches-py/ "
                          "(add data.download=true to fetch it when online)")
    root = Path(cfg.data.root)
    folder = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing and not cfg.data.download:
        raise ConfigError(f"CIFAR-10 files missing under {folder}: {', '.join(missing)}; point data.root at the "
                          "directory holding cifar-10-batches-py/ or add data.download=true")
    normalize = [T.ToTensor(), T.Normalize(MEAN, STD)]
    augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if cfg.data.augment else []
    train = CIFAR10(str(root), True, T.Compose(augment + normalize), cfg.data.download, cfg.data.verify_checksums)
    val = CIFAR10(str(root), False, T.Compose(normalize), False, cfg.data.verify_checksums)
    model = build_resnet(cfg.model.name, 10, cfg.model.width)
    return classification(model, train, val, cfg.data.batch_size, cfg.data.eval_batch_size, cfg.seed,
                          cfg.task.label_smoothing)
