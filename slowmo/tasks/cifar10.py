"""CIFAR-10 through torchvision's ``CIFAR10`` loader (the python-pickle batches under ``data.root``), CIFAR
ResNet, standard augmentation (random crop with 4-pixel padding, horizontal flip), top-1 accuracy."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..models import ModelConfig, build_model
from ..registry import ConfigError, setting
from .base import TASKS, ImageData, Task, TaskConfig, TaskContext, classification

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
HAND_WRITTEN = "files written by hand, not the official batches, need data.verify_checksums=false"


def _cifar10(root: str, train: bool, transform, download: bool):
    """torchvision's ``CIFAR10``, reading only: the MD5 check is :func:`_check_files`'s, so that files written by tests
    or converted by hand can be read with ``data.verify_checksums=false``. (torchvision is imported here: it takes
    seconds, and a config check or a run of another task needs none of it.)"""
    from torchvision.datasets import CIFAR10

    dataset = CIFAR10.__new__(CIFAR10)  # its lists of files without their MD5s, before its __init__ checks them
    dataset.train_list = [[name, None] for name, _ in CIFAR10.train_list]
    dataset.test_list = [[name, None] for name, _ in CIFAR10.test_list]
    dataset.meta = dict(CIFAR10.meta, md5=None)
    dataset.__init__(root, train=train, transform=transform, download=download)
    return dataset


def _check_files(folder: Path, download: bool, verify_checksums: bool) -> None:
    """One line for missing batch files, or for files that fail torchvision's MD5 check (torchvision's own error,
    "Dataset not found or corrupted", names neither the files nor the way out)."""
    from torchvision.datasets import CIFAR10
    from torchvision.datasets.utils import check_integrity

    expected = [*CIFAR10.train_list, *CIFAR10.test_list, [CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    missing = [name for name, _ in expected if not (folder / name).is_file()]
    if missing and not download:
        raise ConfigError(
            f"CIFAR-10 files missing under {folder}: {', '.join(missing)}; point data.root at the directory holding "
            f"cifar-10-batches-py/ or add data.download=true ({HAND_WRITTEN})"
        )
    corrupt = [
        n for n, md5 in expected if verify_checksums and n not in missing and not check_integrity(folder / n, md5)
    ]
    if corrupt:
        raise ConfigError(
            f"CIFAR-10 files under {folder} fail torchvision's MD5 check: {', '.join(corrupt)}; download the official "
            f"batches again (data.download=true fetches them) ({HAND_WRITTEN})"
        )


def write_batches(root: Path, per_batch: int, seed: int = 0) -> Path:
    """A CIFAR-10 of ``5 * per_batch`` training and ``per_batch`` test images in torchvision's on-disk format
    (``root/cifar-10-batches-py/``: data_batch_1..5 and test_batch, dicts of 'data', uint8 N x 3072, and 'labels';
    batches.meta), with random pixels whose red plane encodes the label (learnable): for tests, and for timing where
    the real batches cannot be had (``per_batch`` = 10,000: the real sizes). Read with ``data.verify_checksums=false``.
    Returns ``root``."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, per_batch)
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        data[:, :1024] = (labels[:, None] * 25).astype(np.uint8)
        batch = {"batch_label": name, "labels": labels.tolist(), "data": data}
        with open(folder / name, "wb") as f:
            pickle.dump({**batch, "filenames": [f"{i}.png" for i in range(per_batch)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch}, f)
    return Path(root)


@dataclass
class CIFAR10Data(ImageData):
    root: str | None = setting(run_control=True)  # the directory holding cifar-10-batches-py/
    augment: bool  # random crop (4-pixel padding) and horizontal flip
    download: bool = setting(run_control=True)  # fetch the batches when online
    verify_checksums: bool = setting(run_control=True)  # torchvision's MD5 check of the batch files


@TASKS.register(
    "cifar10",
    TaskConfig,
    data=CIFAR10Data,
    label="CIFAR-10",
    inputs="images",
    needs="an image model",
    imports=("torchvision",),
)
def build(task: TaskConfig, data: CIFAR10Data, model: ModelConfig, ctx: TaskContext) -> Task:
    if data.root is None:
        raise ConfigError(
            "task cifar10 needs data.root: the directory holding cifar-10-batches-py/ "
            "(add data.download=true to fetch it when online)"
        )
    import torchvision.transforms as T

    root = Path(data.root)
    _check_files(root / "cifar-10-batches-py", data.download, data.verify_checksums)
    normalize = [T.ToTensor(), T.Normalize(MEAN, STD)]
    augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if data.augment else []
    train = _cifar10(str(root), True, T.Compose(augment + normalize), data.download)
    val = _cifar10(str(root), False, T.Compose(normalize), False)
    net = build_model(model, num_classes=10, input_shape=(3, 32, 32))
    return classification(net, train, val, data, ctx, task.label_smoothing)
