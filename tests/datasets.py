"""Small datasets written in each dataset's native on-disk format, for the real loaders (CIFAR-10's writer is
:func:`slowmo.tasks.cifar10.write_batches`: the GPU benchmark writes its timing data with it)."""

from pathlib import Path

import numpy as np
from PIL import Image


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
