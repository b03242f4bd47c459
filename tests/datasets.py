"""Small datasets written in each dataset's native on-disk format, for the real loaders."""

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_cifar10(root: Path, per_batch: int = 16, seed: int = 0, skip: tuple[str, ...] = ()) -> Path:
    """cifar-10-batches-py/: data_batch_1..5, test_batch (dicts with 'data' uint8 N x 3072, 'labels'),
    batches.meta ('label_names'); keys are str, as torchvision reads them."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        if name in skip:
            continue
        labels = rng.integers(0, 10, per_batch)
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        data[:, :1024] = (labels[:, None] * 25).astype(np.uint8)  # the red plane encodes the label: learnable
        with open(folder / name, "wb") as f:
            pickle.dump(
                {
                    "batch_label": name,
                    "labels": labels.tolist(),
                    "data": data,
                    "filenames": [f"{i}.png" for i in range(per_batch)],
                },
                f,
            )
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch}, f)
    return root


def write_imagefolder(root: Path, classes=("cat", "dog"), per_class: int = 4, size: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                pixels[..., c % 3] = 255
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


WORDS_EN = ["the", "cat", "dog", "house", "green", "small", "sees", "likes", "a", "big"]
WORDS_DE = ["die", "katze", "hund", "haus", "grün", "klein", "sieht", "mag", "eine", "groß"]


def write_parallel(root: Path, n_train: int = 64, n_valid: int = 8, seed: int = 0, n_test: int = 0) -> Path:
    """train.en/train.de, valid.en/valid.de (and newstest2014.en/.de with ``n_test`` lines): a word-for-word toy
    language pair, one sentence per line."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("valid", n_valid), ("newstest2014", n_test)):
        if n == 0:
            continue
        idx = [rng.integers(0, len(WORDS_EN), rng.integers(3, 7)) for _ in range(n)]
        (root / f"{split}.en").write_text("\n".join(" ".join(WORDS_EN[i] for i in s) for s in idx) + "\n")
        (root / f"{split}.de").write_text("\n".join(" ".join(WORDS_DE[i] for i in s) for s in idx) + "\n")
    return root
