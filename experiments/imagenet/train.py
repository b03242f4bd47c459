"""Train on imagenet: `python experiments/imagenet/train.py [overrides]` (see configs/ and the README)."""

from slowmo.train.cli import entrypoint

if __name__ == "__main__":
    entrypoint("imagenet")
