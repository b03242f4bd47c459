"""Train on MNIST-1D: `python experiments/mnist1d/train.py [overrides]` (see configs/ and the README)."""

from slowmo.train.cli import entrypoint

if __name__ == "__main__":
    entrypoint("mnist1d")
