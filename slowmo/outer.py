"""SlowMo (Wang, Tantia, Ballas & Rabbat, ICLR 2020): Algorithm 1 over any base algorithm. Paper -> this file:

    u_0 = 0; x_{0,0} the same on every rank            _start: broadcast by DistributedOptimizer, u = 0
    for k = 0 .. tau-1: x_{t,k+1} = x_{t,k} - gamma_t d_{t,k}   DistributedOptimizer.step (algorithm + base step)
    x_{t,tau} = (1/m) sum_i x^i_{t,tau}                 _outer_step: flush in-flight gossip, Shard.mean_
                                                        (skipped when the ranks hold equal replicas: AllReduce)
    u_{t+1} = beta u_t + (x_{t,0} - x_{t,tau}) / gamma_t   _outer_step: u.mul_(beta).add_(Delta, alpha=1/gamma)
    x_{t+1,0} = x_{t,0} - alpha gamma_t u_{t+1}         _outer_step: x0.add_(u, alpha=-alpha gamma), into the model

gamma_t is the lr of each parameter's base param group at the outer step. ``nesterov=True``: x_{t+1,0} =
x_{t,0} - alpha gamma_t (beta u_{t+1} + (x_{t,0} - x_{t,tau}) / gamma_t) (DiLoCo's form). At the exact average the
floating-point buffers (BatchNorm statistics) are averaged and push-sum weights reset to 1; then the base
optimizer's buffers are kept, reset or averaged (``base_buffers``; the paper zeroes SGD's for images, keeps Adam's
for WMT). ``pseudo_gradient="raw"`` is BMUF's and DiLoCo's convention: u_{t+1} = beta u_t + (x_{t,0} - x_{t,tau})
and x_{t+1,0} = x_{t,0} - alpha u_{t+1}, with alpha an absolute lr; the two agree under a constant gamma.
Presets (``SlowMo.bmuf``, ``.lookahead``, ``.diloco``): :mod:`slowmo.presets`; the sharded state: :mod:`slowmo.shard`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from .algorithms import Algorithm
from .flat import average_
from .inner import DistributedOptimizer
from .presets import Presets, check_settings
from .shard import Shard


class SlowMo(Presets, DistributedOptimizer):
    """Slow momentum on top of a base algorithm: one call to :meth:`step` is one inner step; every ``tau``-th is
    followed by the outer step.

    Args:
        params, base_optimizer, algorithm: as :class:`~slowmo.DistributedOptimizer`.
        tau: inner steps per outer iteration. alpha: slow learning rate (the paper: 1). beta: slow momentum in
            [0, 1) (the paper tunes it in 0.4-0.8); alpha=1, beta=0 gives back the base algorithm with an exact
            average every tau steps. nesterov: the Nesterov form of the outer update.
        base_buffers: "keep", "reset" or "average" the base optimizer's state at each outer step.
        shard_outer_state: keep u and x_{t,0} for this rank's 1/m of the parameters only (same result).
        pseudo_gradient: "scaled" (SlowMo's) or "raw" (BMUF's and DiLoCo's).
    """

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[dict],
        base_optimizer: torch.optim.Optimizer,
        algorithm: Algorithm,
        tau: int = 12,
        alpha: float = 1.0,
        beta: float = 0.0,
        nesterov: bool = False,
        base_buffers: Literal["keep", "reset", "average"] = "keep",
        shard_outer_state: bool = False,
        pseudo_gradient: Literal["scaled", "raw"] = "scaled",
    ) -> None:
        check_settings(tau=tau, alpha=alpha, beta=beta, base_buffers=base_buffers, pseudo_gradient=pseudo_gradient)
        self.shard_outer_state = shard_outer_state  # before the flat buffers are made: they are padded for it
        super().__init__(params, base_optimizer, algorithm)
        self.tau, self.alpha, self.beta, self.nesterov = tau, float(alpha), float(beta), bool(nesterov)
        self.base_buffers, self.pseudo_gradient = base_buffers, pseudo_gradient
        self._shard = Shard(self.comm, self.flat.numel, shard_outer_state)
        self._x0: torch.Tensor | None = None  # x_{t,0} (this rank's slice when sharded)
        self._u: torch.Tensor | None = None  # u_t (likewise)
        self._outer = 0

    @property
    def outer_step(self) -> int:
        """Number of outer iterations completed (t)."""
        return self._outer

    def _flat_multiple(self) -> int:
        return self.comm.world_size if self.shard_outer_state else 1

    def _start(self) -> None:
        super()._start()  # every rank now holds rank 0's parameters: x_{0,0}
        self._x0 = self._shard.mine(self.flat.data).clone()
        self._u = torch.zeros_like(self._x0)

    def _ends_outer_iteration(self) -> bool:
        return (self._step + 1) % self.tau == 0

    @torch.no_grad()
    def _outer_step(self) -> None:
        """Steps 2-5 in place on the flat buffer: 5 passes over this rank's |theta| (7 with ``nesterov``) and no
        temporary of its size: the buffer holds x_{t,tau}, then Delta = x_{t,0} - x_{t,tau}, then x_{t+1,0}."""
        assert self._x0 is not None and self._u is not None
        self.algorithm.flush()
        equal = self.algorithm.replicas_equal  # every rank holds x_{t,tau} already (AllReduce): no exact average
        mine = self._shard.mine(self.flat.data) if equal else self._shard.mean_(self.flat.data)
        scaled, gammas = self.pseudo_gradient == "scaled", self.learning_rates()
        if scaled and min(gammas) <= 0:
            raise ValueError(
                f"SlowMo divides by the base lr at the outer step, but it is {min(gammas)} at inner step "
                f"{self._step}; keep the lr schedule above 0 (e.g. start warm-up above 0)"
            )
        for a, b, gamma in self._shard.runs(self.flat.runs(gammas)):
            x0, u, x = self._x0[a:b], self._u[a:b], mine[a:b]
            scale, lr = (1.0 / gamma, self.alpha * gamma) if scaled else (1.0, self.alpha)
            torch.sub(x0, x, out=x)  # Delta = x_{t,0} - x_{t,tau}
            u.mul_(self.beta).add_(x, alpha=scale)  # u_{t+1} = beta u_t + Delta / gamma_t
            if self.nesterov:
                x0.add_(u, alpha=-lr * self.beta).add_(x, alpha=-lr * scale)
            else:
                x0.add_(u, alpha=-lr)  # x_{t+1,0} = x_{t,0} - alpha gamma_t u_{t+1}
            x.copy_(x0)
        self._shard.gather_(self.flat.data)
        average_(self.comm, self._buffers)
        self.algorithm.reset_weights()
        self._base_state_(self.base_buffers)  # step 5: keep, reset or average the base optimizer's buffers
        self._outer += 1

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        state = super().state_dict()
        state["outer"] = {
            "t": self._outer,
            "x0": None if self._x0 is None else self._x0.clone(),
            "u": None if self._u is None else self._u.clone(),
            "shard": self._shard.key,
            "numel": self._shard.numel,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        super().load_state_dict(state_dict)
        outer = state_dict["outer"]
        if outer["numel"] != self._shard.numel or outer["shard"] != self._shard.key:
            raise ValueError(
                f"the checkpoint's SlowMo state is for {outer['numel']} parameters sharded as "
                f"{outer['shard']}, this run has {self._shard.numel} sharded as {self._shard.key}; "
                "resume with the same model, world size and shard_outer_state"
            )
        like = self._params[0]
        self._outer = outer["t"]
        self._x0, self._u = (
            None if outer[k] is None else outer[k].to(dtype=like.dtype, device=like.device).clone() for k in ("x0", "u")
        )

    def __repr__(self) -> str:
        return (
            f"SlowMo({type(self.algorithm).__name__}, base={type(self.base_optimizer).__name__}, tau={self.tau}, "
            f"alpha={self.alpha}, beta={self.beta}, nesterov={self.nesterov}, base_buffers={self.base_buffers!r})"
        )
