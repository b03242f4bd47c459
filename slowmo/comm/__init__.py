"""Communicators: one interface (:class:`Communicator`), a real backend and an in-process simulator."""

from . import launch
from .base import CommError, Communicator, Single, ring_all_reduce_bytes
from .simulated import Simulated
from .spawn import free_port, spawn
from .torch_distributed import TorchDistributed

__all__ = [
    "CommError",
    "Communicator",
    "Simulated",
    "Single",
    "TorchDistributed",
    "free_port",
    "launch",
    "ring_all_reduce_bytes",
    "spawn",
]
