"""Plain-NumPy statements of the method, sharing no code with the engine: Algorithm 1 over the four base algorithms
(:mod:`.algorithm1`), the options beyond it (:mod:`.beyond`) and the compressed formats (:mod:`.codes`). Run the engine
on the same problem and compare; the tests do, to ~1e-15.

    from slowmo.reference import Problem, reference
    theta = reference(Problem("sgp", outer=dict(tau=4, update=dict(beta=0.5))))   # (ranks, d + 1)
"""

from .algorithm1 import Problem, lr_at, make_data, reference, slow_momentum

__all__ = ["Problem", "lr_at", "make_data", "reference", "slow_momentum"]
