"""The training stack shared by every task: config schema, loop, checkpoints, loggers, schedules."""

from .config import Config, ConfigError, validate
from .loop import NonFiniteLoss, build_optimizer, run, train_rank

__all__ = ["Config", "ConfigError", "NonFiniteLoss", "build_optimizer", "run", "train_rank", "validate"]
