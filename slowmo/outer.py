"""SlowMo (Wang, Tantia, Ballas & Rabbat, ICLR 2020): Algorithm 1 over any base algorithm. Paper -> this file:

    u_0 = 0; x_{0,0} the same on every rank            _start: broadcast by DistributedOptimizer, u = 0
    for k = 0 .. tau-1: x_{t,k+1} = x_{t,k} - gamma_t d_{t,k}   DistributedOptimizer.step (algorithm + base step)
    x_{t,tau} = (1/m) sum_i x^i_{t,tau}                 _outer_step: flush in-flight gossip, Shard.mean_
                                                        (skipped when the ranks hold equal replicas: AllReduce)
    u_{t+1} = beta u_t + (x_{t,0} - x_{t,tau}) / gamma_t   _outer_step: v (below) = Delta + m v
    x_{t+1,0} = x_{t,0} - alpha gamma_t u_{t+1}         _outer_step: x_{t,0} - alpha v, into the model

u is kept in parameter units, v_t = gamma_{t-1} u_t, which makes steps 3-4 a momentum step on the pseudo-gradient
Delta = x_{t,0} - x_{t,tau}: v_{t+1} = m v_t + Delta with m = beta gamma_t / gamma_{t-1}, x_{t+1,0} = x_{t,0} -
alpha v_{t+1}, done in place in 4 passes over |theta|; with alpha = 1 (the paper's), the identity x_{t+1,0} =
x_{t,tau} - m v_t (slow momentum as an extrapolation from the average) needs 3. gamma_t is the lr of each parameter's
base param group at the outer step. ``nesterov=True``: x_{t+1,0} = x_{t,0} - alpha gamma_t (beta u_{t+1} + Delta /
gamma_t) (DiLoCo's form). ``pseudo_gradient="raw"`` (BMUF's and DiLoCo's convention): u_{t+1} = beta u_t + Delta,
x_{t+1,0} = x_{t,0} - alpha u_{t+1}, alpha an absolute lr (v = u); the two agree under a constant gamma. Buffers
(BatchNorm statistics) are averaged with x, push-sum weights reset; the base optimizer's state is then kept, reset
or averaged (``base_buffers``). Presets: :mod:`slowmo.presets`; the sharded state: :mod:`slowmo.shard`.
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
        self._x0 = self._v = torch.empty(0)  # x_{t,0} and v_t = gamma_{t-1} u_t (this rank's slice when sharded)
        self._gammas: list[float] | None = None  # gamma_{t-1} of each parameter
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
        self._v = torch.zeros_like(self._x0)

    def _ends_outer_iteration(self) -> bool:
        return (self._step + 1) % self.tau == 0

    @torch.no_grad()
    def _outer_step(self) -> None:
        """Steps 2-5 in place: x_{t,tau} is averaged where the model holds it; 3 passes (alpha = 1) or 4-5."""
        self.algorithm.flush()
        equal = self.algorithm.replicas_equal  # every rank holds x_{t,tau} already (AllReduce): no exact average
        x_tau = self._shard.mine(self.flat.data) if equal else self._shard.mean_(self.flat.data)
        gammas, scaled = self.learning_rates(), self.pseudo_gradient == "scaled"
        if scaled and min(gammas) <= 0:
            raise ValueError(
                f"SlowMo divides by the base lr at the outer step, but it is {min(gammas)} at inner step "
                f"{self._step}; keep the lr schedule above 0 (e.g. start warm-up above 0)"
            )
        previous = self._gammas or gammas  # (at t = 0, v = 0: nothing to rescale)
        extrapolate = self.alpha == 1.0 and not self.nesterov
        for a, b, (gamma, last) in self._shard.runs(self.flat.runs(list(zip(gammas, previous, strict=True)))):
            x0, v, x = self._x0[a:b], self._v[a:b], x_tau[a:b]
            m = self.beta * (gamma / last if scaled else 1.0)  # v_t in the units of gamma_t
            if extrapolate:
                x.add_(v, alpha=-m)  # x_{t+1,0} = x_{t,tau} - m v_t
                x0.sub_(x)  # v_{t+1} = x_{t,0} - x_{t+1,0}, where x_{t,0} was: the two buffers swap roles below
            else:
                torch.sub(x0, x, out=x)  # Delta
                torch.add(x, v, alpha=m, out=v)  # v_{t+1} = m v_t + Delta
                if self.nesterov:  # x_{t+1,0} = x_{t,0} - alpha (beta v_{t+1} + Delta)
                    torch.add(x0, x, alpha=-self.alpha, out=x).add_(v, alpha=-self.alpha * self.beta)
                else:
                    torch.add(x0, v, alpha=-self.alpha, out=x)  # x_{t+1,0} = x_{t,0} - alpha v_{t+1}
        if extrapolate:
            self._x0, self._v = self._v, self._x0
        self._x0.copy_(x_tau)
        self._gammas = gammas
        self._shard.gather_(self.flat.data)
        average_(self.comm, self._buffers)
        self.algorithm.reset_weights()
        self._base_state_(self.base_buffers)  # step 5: keep, reset or average the base optimizer's buffers
        self._outer += 1

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        state = super().state_dict()
        outer = {"t": self._outer, "gammas": self._gammas, "shard": self._shard.key, "numel": self._shard.numel}
        state["outer"] = outer | {"x0": self._x0.clone(), "v": self._v.clone()}
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
        like = self.flat.data
        self._outer, self._gammas = outer["t"], outer["gammas"]
        self._x0, self._v = (outer[k].to(dtype=like.dtype, device=like.device).clone() for k in ("x0", "v"))

    def __repr__(self) -> str:
        knobs = f"tau={self.tau}, alpha={self.alpha}, beta={self.beta}, nesterov={self.nesterov}"
        return f"SlowMo({type(self.algorithm).__name__}, base={type(self.base_optimizer).__name__}, {knobs})"
