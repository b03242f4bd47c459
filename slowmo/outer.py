"""SlowMo, the outer optimizer (Wang et al., ICLR 2020, Algorithm 1), and its presets: BMUF, Lookahead, DiLoCo.

One outer iteration t, on every rank, from x_{t,0} (equal on all ranks):

1. tau inner steps of the base algorithm with base lr gamma_t (see :class:`~slowmo.inner.DistributedOptimizer`);
2. exact average x_{t,tau} = (1/m) sum_i x^i_{t,tau} of the de-biased parameters (push-sum weights back to 1;
   floating-point buffers such as BatchNorm statistics are averaged too);
3. slow momentum  u_{t+1} = beta u_t + (x_{t,0} - x_{t,tau}) / gamma_t           (u_0 = 0);
4. outer update   x_{t+1,0} = x_{t,0} - alpha gamma_t u_{t+1};
   with ``nesterov=True``: x_{t+1,0} = x_{t,0} - alpha gamma_t (beta u_{t+1} + (x_{t,0} - x_{t,tau}) / gamma_t);
5. base optimizer buffers: kept, reset to zero, or averaged over ranks.

gamma_t is the current lr of the base optimizer's param group holding each parameter, read at the outer step.

Pseudo-gradient conventions. SlowMo's ("scaled", above) divides the displacement by gamma_t and multiplies it
back, so u does not depend on the lr schedule's scale. BMUF and DiLoCo ("raw") use the displacement itself with an
absolute outer lr: u_{t+1} = beta u_t + (x_{t,0} - x_{t,tau}), x_{t+1,0} = x_{t,0} - alpha u_{t+1}. The two agree
when gamma is constant.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Literal

import torch
from torch import nn

from .algorithms import Algorithm, LocalSGD
from .algorithms.base import average_, flatten, unflatten_
from .comm import Single
from .inner import DistributedOptimizer

BaseBuffers = Literal["keep", "reset", "average"]
PseudoGradient = Literal["scaled", "raw"]


class SlowMo(DistributedOptimizer):
    """Slow momentum on top of any base algorithm.

    Args:
        params: the model (its floating-point buffers are then averaged at each outer step) or its parameters.
        base_optimizer: the inner optimizer over the same parameters (SGD with Nesterov, Adam, ...).
        algorithm: the base algorithm (:class:`~slowmo.AllReduce`, :class:`~slowmo.LocalSGD`, :class:`~slowmo.SGP`,
            :class:`~slowmo.OSGP`).
        tau: inner steps per outer iteration.
        alpha: slow learning rate (the paper: 1.0).
        beta: slow momentum in [0, 1) (the paper tunes it in 0.4-0.8); alpha=1, beta=0 gives back the base
            algorithm with an exact average every tau steps.
        nesterov: Nesterov form of the outer update (DiLoCo's outer step).
        base_buffers: what happens to the base optimizer's state at each outer step: "keep" (the official code,
            the paper's WMT runs), "reset" to zero as a fresh optimizer (the paper's image runs) or "average".
        shard_outer_state: keep u and x_{t,0} only for this rank's 1/m slice of the flattened parameters
            (reduce-scatter, update the slice, all-gather): 2|theta|/m extra memory instead of 2|theta|, same result.
        pseudo_gradient: "scaled" (SlowMo's convention, above) or "raw" (BMUF/DiLoCo's, alpha an absolute lr).
    """

    def __init__(self, params: nn.Module | Iterable[torch.Tensor] | Iterable[dict],
                 base_optimizer: torch.optim.Optimizer, algorithm: Algorithm, tau: int = 12, alpha: float = 1.0,
                 beta: float = 0.0, nesterov: bool = False, base_buffers: BaseBuffers = "keep",
                 shard_outer_state: bool = False, pseudo_gradient: PseudoGradient = "scaled") -> None:
        if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
            raise ValueError(f"tau must be an integer >= 1 (inner steps per outer step), got {tau!r}")
        if not alpha > 0 or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number > 0 (slow learning rate; the paper uses 1.0), got {alpha!r}")
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1) (slow momentum; the paper tunes it in 0.4-0.8), got {beta!r}")
        if base_buffers not in ("keep", "reset", "average"):
            raise ValueError(f"base_buffers must be 'keep', 'reset' or 'average', got {base_buffers!r}")
        if pseudo_gradient not in ("scaled", "raw"):
            raise ValueError(f"pseudo_gradient must be 'scaled' (SlowMo) or 'raw' (BMUF/DiLoCo), got {pseudo_gradient!r}")
        super().__init__(params, base_optimizer, algorithm)
        self.tau, self.alpha, self.beta, self.nesterov = tau, float(alpha), float(beta), bool(nesterov)
        self.base_buffers, self.shard_outer_state, self.pseudo_gradient = base_buffers, shard_outer_state, pseudo_gradient
        self._numel = sum(p.numel() for p in self._params)
        n = self.comm.world_size
        self._chunk = -(-self._numel // n) if shard_outer_state else self._numel  # this rank's slice length
        self._x0: torch.Tensor | None = None  # x_{t,0} (this rank's slice when sharded)
        self._u: torch.Tensor | None = None   # u_t (likewise)
        self._outer = 0

    @property
    def outer_step(self) -> int:
        """Number of outer iterations completed (t)."""
        return self._outer

    # ----------------------------------------------------------------------------------- presets
    @classmethod
    def bmuf(cls, params, base_optimizer: torch.optim.Optimizer, algorithm: Algorithm, tau: int,
             block_lr: float = 1.0, block_momentum: float | None = None, nesterov: bool = False,
             **kwargs: Any) -> "SlowMo":
        """Blockwise model-update filtering (Chen & Huo, 2016) over a Local SGD algorithm.

        Delta_t = eta Delta_{t-1} + zeta (x_{t,tau} - x_{t,0});  x_{t+1,0} = x_{t,0} + Delta_t
        (nesterov: x_{t+1,0} = x_{t,0} + eta Delta_t + zeta (x_{t,tau} - x_{t,0})), i.e. SlowMo with the raw
        pseudo-gradient, alpha = block learning rate zeta, beta = block momentum eta (default 1 - 1/m).
        """
        if block_momentum is None:
            block_momentum = 1.0 - 1.0 / algorithm.comm.world_size
        return cls(params, base_optimizer, algorithm, tau=tau, alpha=block_lr, beta=block_momentum,
                   nesterov=nesterov, pseudo_gradient="raw", **kwargs)

    @classmethod
    def lookahead(cls, params, base_optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5,
                  algorithm: Algorithm | None = None, **kwargs: Any) -> "SlowMo":
        """Lookahead (Zhang et al., 2019): k fast steps, then phi <- phi + alpha (theta - phi).

        SlowMo with tau = k, beta = 0 on a single worker (``algorithm`` defaults to one rank, no communication).
        """
        algorithm = algorithm if algorithm is not None else LocalSGD(Single())
        return cls(params, base_optimizer, algorithm, tau=k, alpha=alpha, beta=0.0, **kwargs)

    @classmethod
    def diloco(cls, params, base_optimizer: torch.optim.Optimizer, algorithm: Algorithm, tau: int = 500,
               outer_lr: float = 0.7, outer_momentum: float = 0.9, **kwargs: Any) -> "SlowMo":
        """DiLoCo's outer step (Douillard et al., 2023): Nesterov SGD with lr ``outer_lr`` and momentum
        ``outer_momentum`` on the raw pseudo-gradient Delta = x_{t,0} - x_{t,tau}:

        u_{t+1} = mu u_t + Delta;  x_{t+1,0} = x_{t,0} - lr (mu u_{t+1} + Delta)

        i.e. SlowMo with nesterov=True, the raw pseudo-gradient, alpha = outer_lr, beta = outer_momentum.
        The base optimizer (AdamW in the paper) keeps its state.
        """
        return cls(params, base_optimizer, algorithm, tau=tau, alpha=outer_lr, beta=outer_momentum,
                   nesterov=True, pseudo_gradient="raw", **kwargs)

    # ----------------------------------------------------------------------------------- Algorithm 1
    def _start(self) -> None:
        super()._start()  # every rank now holds rank 0's parameters
        self._x0 = self._my_slice(self._flat_params()).clone()
        self._u = torch.zeros_like(self._x0)

    def _ends_outer_iteration(self) -> bool:
        return (self._step + 1) % self.tau == 0

    @torch.no_grad()
    def _outer_step(self) -> None:
        assert self._x0 is not None and self._u is not None
        self.algorithm.flush()
        n = self.comm.world_size
        gamma = self._my_slice(self._learning_rates())
        if self.shard_outer_state:
            x_tau = torch.empty_like(self._x0)
            self.comm.reduce_scatter(x_tau, self._flat_params()).div_(n)  # this rank's slice of the exact average
        else:
            x_tau = self.comm.all_reduce(self._flat_params(), "mean")
        self._x0.copy_(self._slow_update(self._x0, self._u, x_tau, gamma))
        if self.shard_outer_state:
            full = torch.empty(self._chunk * n, dtype=self._x0.dtype, device=self._x0.device)
            self.comm.all_gather(full, self._x0)
            unflatten_(full, self._params)
        else:
            unflatten_(self._x0, self._params)
        average_(self.comm, self._buffers)
        self.algorithm.reset_weights()
        self._update_base_buffers()
        self._outer += 1

    def _slow_update(self, x0: torch.Tensor, u: torch.Tensor, x_tau: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """Steps 3-4 on flat tensors: updates u in place, returns x_{t+1,0}."""
        if self.pseudo_gradient == "scaled":
            displacement = (x0 - x_tau).div_(gamma)
            lr = self.alpha * gamma
        else:
            displacement = x0 - x_tau
            lr = self.alpha
        u.mul_(self.beta).add_(displacement)
        direction = self.beta * u + displacement if self.nesterov else u
        return x0 - lr * direction

    def _flat_params(self) -> torch.Tensor:
        flat = flatten(self._params)
        padding = self._chunk * self.comm.world_size - self._numel if self.shard_outer_state else 0
        return torch.cat([flat, flat.new_zeros(padding)]) if padding else flat

    def _my_slice(self, flat: torch.Tensor) -> torch.Tensor:
        if not self.shard_outer_state:
            return flat
        if flat.numel() < self._chunk * self.comm.world_size:  # pad (lr padding is 1: never divides by zero)
            flat = torch.cat([flat, flat.new_ones(self._chunk * self.comm.world_size - flat.numel())])
        return flat[self.comm.rank * self._chunk:(self.comm.rank + 1) * self._chunk]

    def _learning_rates(self) -> torch.Tensor:
        """gamma_t per element of the flat parameters: each parameter's base param group lr, now."""
        lr_of = {id(p): float(group["lr"]) for group in self.base_optimizer.param_groups for p in group["params"]}
        if self.pseudo_gradient == "scaled" and min(lr_of.values()) <= 0:
            raise ValueError(f"SlowMo divides by the base lr at the outer step, but it is {min(lr_of.values())} at "
                             f"inner step {self._step}; keep the lr schedule above 0 (e.g. start warm-up above 0)")
        first = self._params[0]
        return torch.cat([torch.full((p.numel(),), lr_of[id(p)], dtype=first.dtype, device=first.device)
                          for p in self._params])

    def _update_base_buffers(self) -> None:
        if self.base_buffers == "keep":
            return
        state = self.base_optimizer.state
        entries = [(p, value) for p in self._params for _, value in sorted(state.get(p, {}).items())
                   if torch.is_tensor(value) and value.is_floating_point()]
        if self.base_buffers == "reset":  # as a freshly built optimizer: momentum, moments and step counts to 0
            for _, value in entries:
                value.zero_()
        else:  # per-parameter buffers (momentum, moments); step counts are equal on all ranks anyway
            average_(self.comm, [value for p, value in entries if value.shape == p.shape])

    # ----------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        state = super().state_dict()
        state["outer"] = {"t": self._outer, "x0": None if self._x0 is None else self._x0.clone(),
                          "u": None if self._u is None else self._u.clone(),
                          "shard": [self.comm.rank, self.comm.world_size] if self.shard_outer_state else None,
                          "numel": self._numel}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        super().load_state_dict(state_dict)
        outer = state_dict["outer"]
        mine = [self.comm.rank, self.comm.world_size] if self.shard_outer_state else None
        if outer["numel"] != self._numel or outer["shard"] != mine:
            raise ValueError(f"the checkpoint's SlowMo state is for {outer['numel']} parameters sharded as "
                             f"{outer['shard']}, this run has {self._numel} sharded as {mine}; resume with the same "
                             "model, world size and shard_outer_state")
        self._outer = outer["t"]
        like = self._params[0]
        self._x0 = None if outer["x0"] is None else outer["x0"].to(dtype=like.dtype, device=like.device).clone()
        self._u = None if outer["u"] is None else outer["u"].to(dtype=like.dtype, device=like.device).clone()

    def __repr__(self) -> str:
        return (f"SlowMo({type(self.algorithm).__name__}, base={type(self.base_optimizer).__name__}, tau={self.tau}, "
                f"alpha={self.alpha}, beta={self.beta}, nesterov={self.nesterov}, base_buffers={self.base_buffers!r})")
