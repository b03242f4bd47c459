"""Train on cifar10: `python experiments/cifar10/train.py [overrides]` (see configs/ and the README)."""

from slowmo.train.cli import entrypoint

if __name__ == "__main__":
    entrypoint("cifar10")
