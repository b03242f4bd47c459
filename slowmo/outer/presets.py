"""The methods that are SlowMo with some settings fixed, as plain functions that return the outer update, each with its
paper's parameter names and defaults (the harness's ``slowmo=bmuf|lookahead|diloco`` are the same defaults as YAML
files of the parts: ``configs/slowmo/<name>.yaml`` and ``configs/slowmo/update/<name>.yaml``):

    opt = slowmo.SlowMo(model, base, slowmo.LocalSGD(comm), tau=12, update=slowmo.presets.bmuf(comm.world_size))
"""

from __future__ import annotations

from .algorithm1 import SlowMomentum


def bmuf(
    world_size: int, block_lr: float = 1.0, block_momentum: float | None = None, nesterov: bool = False
) -> SlowMomentum:
    """Blockwise model-update filtering (Chen & Huo, 2016), over Local SGD with tau inner steps a block:

    Delta_t = eta Delta_{t-1} + zeta (x_{t,tau} - x_{t,0});  x_{t+1,0} = x_{t,0} + Delta_t
    (nesterov, BMUF's NBM: x_{t+1,0} = x_{t,0} + eta Delta_t + zeta (x_{t,tau} - x_{t,0})): slow momentum on the raw
    pseudo-gradient, alpha = the block learning rate zeta, beta = the block momentum eta (default 1 - 1/m, BMUF's
    rule for m ranks).
    """
    momentum = 1.0 - 1.0 / world_size if block_momentum is None else block_momentum
    return SlowMomentum(block_lr, momentum, nesterov, "raw")


def lookahead(alpha: float = 0.5) -> SlowMomentum:
    """Lookahead (Zhang et al., 2019): k = tau fast steps (5), then phi <- phi + alpha (theta - phi): slow momentum
    with beta = 0 (run it over a single worker, ``LocalSGD(Single())``, or over any base algorithm)."""
    return SlowMomentum(alpha, 0.0)


def diloco(outer_lr: float = 0.7, outer_momentum: float = 0.9) -> SlowMomentum:
    """DiLoCo's outer step (Douillard et al., 2023): Nesterov SGD with lr ``outer_lr`` and momentum
    ``outer_momentum`` on the raw pseudo-gradient Delta = x_{t,0} - x_{t,tau}, every tau (500) inner steps:

    u_{t+1} = mu u_t + Delta;  x_{t+1,0} = x_{t,0} - lr (mu u_{t+1} + Delta)

    i.e. slow momentum in its Nesterov form, alpha = outer_lr, beta = outer_momentum. The base optimizer (AdamW in
    the paper) keeps its state.
    """
    return SlowMomentum(outer_lr, outer_momentum, True, "raw")
