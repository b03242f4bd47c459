"""Tasks: one module each (data + model + loss + metric), registered by name in :data:`TASKS` (a new task is one
module here plus ``configs/task/<name>.yaml``)."""

from pkgutil import extend_path

from .base import TASKS, Task, TaskConfig, TaskContext

__path__ = extend_path(__path__, __name__)
__all__ = ["TASKS", "Task", "TaskConfig", "TaskContext"]
