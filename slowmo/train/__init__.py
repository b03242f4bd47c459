"""The training stack shared by every task: config, loop, data, precision, checkpoints, loggers, schedules."""

from ..registry import ConfigError
from .config import Config, compose, validate
from .launcher import run
from .loop import build_optimizer, place_model, train_rank
from .losses import NonFiniteLoss

__all__ = [
    "Config",
    "ConfigError",
    "NonFiniteLoss",
    "build_optimizer",
    "compose",
    "place_model",
    "run",
    "train_rank",
    "validate",
]
