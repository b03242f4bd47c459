"""Train on the generated language pair: `python experiments/synthetic_translation/train.py [overrides]` (see configs/
and the README)."""

from slowmo.train.cli import entrypoint

if __name__ == "__main__":
    entrypoint("synthetic_translation")
