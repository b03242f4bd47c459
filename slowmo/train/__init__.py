"""The training stack shared by every task: config, loop, data, precision, checkpoints, loggers, schedules."""

from ..registry import ConfigError
from .config import Config, compose, validate
from .launcher import run
from .loop import build_optimizer, train_rank
from .losses import NonFiniteLoss

__all__ = ["Config", "ConfigError", "NonFiniteLoss", "build_optimizer", "compose", "run", "train_rank", "validate"]
