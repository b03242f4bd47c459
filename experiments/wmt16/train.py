"""Train on wmt16: `python experiments/wmt16/train.py [overrides]` (see configs/ and the README)."""

from slowmo.train.cli import entrypoint

if __name__ == "__main__":
    entrypoint("wmt16")
