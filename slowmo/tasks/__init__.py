"""Tasks: one file each (data + model + loss + metric), built from the config."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .base import Task

if TYPE_CHECKING:  # the harness imports the tasks; importing it here would make a cycle
    from ..train.config import Config


def build_task(cfg: "Config", run_dir: Path) -> Task:
    name = cfg.task.name
    if name == "digits":
        from .digits import build
    elif name == "synthetic":
        from .synthetic import build
    elif name == "cifar10":
        from .cifar10 import build
    elif name == "imagenet":
        from .imagenet import build
    else:
        from .wmt16 import build

        return build(cfg, run_dir)
    return build(cfg)


__all__ = ["Task", "build_task"]
