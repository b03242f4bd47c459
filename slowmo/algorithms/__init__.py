"""Base algorithms: each owns the communication of one inner step, and registers itself in :data:`ALGORITHMS`
(a new algorithm is one module here plus ``configs/algorithm/<name>.yaml``; a directory on ``PYTHONPATH`` holding
``slowmo/algorithms/<name>.py`` adds one from outside the source tree)."""

from pkgutil import extend_path

from .allreduce import AllReduce
from .base import ALGORITHMS, Algorithm, AlgorithmConfig
from .local_sgd import LocalSGD
from .sgp import OSGP, SGP

__path__ = extend_path(__path__, __name__)
__all__ = ["ALGORITHMS", "Algorithm", "AlgorithmConfig", "AllReduce", "LocalSGD", "OSGP", "SGP"]
