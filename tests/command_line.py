"""What the tests that use the command line share: the repository's root and the training command."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(*args: str, backend: str = "gloo") -> list[str]:
    """``python experiments/digits/train.py dist=<backend> dist.world_size=2 <args>``."""
    return [sys.executable, str(ROOT / "experiments/digits/train.py"), f"dist={backend}", "dist.world_size=2", *args]
