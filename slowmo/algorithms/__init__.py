"""Base algorithms: each owns the communication of one inner step."""

from .allreduce import AllReduce
from .base import Algorithm
from .local_sgd import LocalSGD
from .sgp import OSGP, SGP

__all__ = ["Algorithm", "AllReduce", "LocalSGD", "OSGP", "SGP"]
