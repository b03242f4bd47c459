"""SlowMo's outer update (Wang, Tantia, Ballas & Rabbat, ICLR 2020, Algorithm 1), in closed form. Paper -> this file:

    u_0 = 0; x_{0,0} the same on every rank                bind: x0 = x_{0,0}, v = 0
    for k = 0 .. tau-1: x_{t,k+1} = x_{t,k} - gamma_t d_{t,k}   the inner steps (SlowMo.step: algorithm + base step)
    x_{t,tau} = (1/m) sum_i x^i_{t,tau}                    the mean (slowmo.outer.exact: an all-reduce)
    u_{t+1} = beta u_t + (x_{t,0} - x_{t,tau}) / gamma_t    step: v_{t+1} = m v_t + Delta
    x_{t+1,0} = x_{t,0} - alpha gamma_t u_{t+1}             step: x_{t,0} - alpha v_{t+1}

u is kept in parameter units, v_t = gamma_{t-1} u_t, which makes the last two lines a momentum step on the
pseudo-gradient Delta = x_{t,0} - x_{t,tau}: v_{t+1} = m v_t + Delta with m = beta gamma_t / gamma_{t-1} (the base lr of
each parameter's group at the outer step), x_{t+1,0} = x_{t,0} - alpha v_{t+1}. With alpha = 1 (the paper's) and the
averaged model at hand, the identity x_{t+1,0} = x_{t,tau} - m v_t (slow momentum as an extrapolation from the
average) takes 3 passes over |theta| in place, the averaging included, and alpha = 1, beta = 0 gives back the base
algorithm with an exact average every tau steps, bit for bit.

``nesterov=True``: x_{t+1,0} = x_{t,0} - alpha gamma_t (beta u_{t+1} + Delta / gamma_t) (DiLoCo's form).
``pseudo_gradient="raw"`` (BMUF's and DiLoCo's convention): u_{t+1} = beta u_t + Delta, x_{t+1,0} = x_{t,0} - alpha
u_{t+1}, alpha an absolute lr (v = u); the two conventions agree under a constant gamma.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .parts import UPDATES, Piece, Update, merge

PSEUDO_GRADIENTS = ("scaled", "raw")


@dataclass
class SlowMomentumConfig:
    """``slowmo/update=slow_momentum`` (and the presets' ``bmuf``, ``lookahead``, ``diloco``): slow momentum's knobs."""

    name: str
    alpha: float  # the slow learning rate (the paper: 1)
    beta: float  # the slow momentum, in [0, 1)
    nesterov: bool  # the Nesterov form (DiLoCo's)
    pseudo_gradient: str  # scaled: Delta_bar / gamma_t (SlowMo's) | raw: Delta_bar (BMUF's, DiLoCo's)

    def check(self) -> None:
        check(alpha=self.alpha, beta=self.beta, pseudo_gradient=self.pseudo_gradient)


@UPDATES.register("slow_momentum", SlowMomentumConfig, label="slow momentum (Algorithm 1)")
class SlowMomentum(Update):
    """Algorithm 1's outer update: slow momentum beta, slow lr alpha, heavy ball or Nesterov, on Delta / gamma_t
    (``pseudo_gradient="scaled"``, SlowMo's) or on Delta (``"raw"``, BMUF's and DiLoCo's)."""

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 0.0,
        nesterov: bool = False,
        pseudo_gradient: Literal["scaled", "raw"] = "scaled",
    ) -> None:
        check(alpha=alpha, beta=beta, pseudo_gradient=pseudo_gradient)
        self.alpha, self.beta, self.nesterov = float(alpha), float(beta), bool(nesterov)
        self.pseudo_gradient = pseudo_gradient
        self.x0 = self.v = torch.empty(0)

    def bind(self, x0: torch.Tensor) -> None:
        self.x0, self.v = x0.clone(), torch.zeros_like(x0)

    def pieces_by(self, piece: Piece) -> Any:
        return piece.gamma, piece.previous

    def step(self, pieces: list[Piece]) -> None:
        for piece in merge(pieces, self.pieces_by):
            a, b = piece.start, piece.end
            delta, x0, v = piece.delta, self.x0[a:b], self.v[a:b]
            torch.add(delta, v, alpha=self._m(piece), out=v)  # v_{t+1} = m v_t + Delta
            if self.nesterov:  # x_{t+1,0} = x_{t,0} - alpha (beta v_{t+1} + Delta)
                torch.add(x0, delta, alpha=-self.alpha, out=delta).add_(v, alpha=-self.alpha * self.beta)
            else:
                torch.add(x0, v, alpha=-self.alpha, out=delta)  # x_{t+1,0} = x_{t,0} - alpha v_{t+1}
            x0.copy_(delta)

    def step_from_average(self, pieces: list[Piece]) -> bool:
        """alpha = 1, heavy ball: x_{t+1,0} = x_{t,tau} - m v_t and v_{t+1} = x_{t,0} - x_{t+1,0}, 3 passes."""
        if self.alpha != 1.0 or self.nesterov:
            return False
        pieces = merge(pieces, self.pieces_by)
        for piece in pieces:  # where x_{t,0} was, v_{t+1}
            x = piece.delta.add_(self.v[piece.start : piece.end], alpha=-self._m(piece))
            self.x0[piece.start : piece.end].sub_(x)
        self.x0, self.v = self.v, self.x0  # the two buffers swap roles; x0 receives x_{t+1,0}
        for piece in pieces:
            self.x0[piece.start : piece.end].copy_(piece.delta)
        return True

    def _m(self, piece: Piece) -> float:
        """m = beta gamma_t / gamma_{t-1} (v_t in the units of gamma_t), or beta for the raw pseudo-gradient."""
        return self.beta * (piece.gamma / piece.previous if self.pseudo_gradient == "scaled" else 1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"x0": self.x0.clone(), "v": self.v.clone()}

    def load_state_dict(self, state: dict[str, Any], like: torch.Tensor) -> None:
        self.x0, self.v = (state[key].to(dtype=like.dtype, device=like.device).clone() for key in ("x0", "v"))

    def __repr__(self) -> str:
        return (
            f"SlowMomentum(alpha={self.alpha}, beta={self.beta}, nesterov={self.nesterov}, "
            f"pseudo_gradient={self.pseudo_gradient!r})"
        )


def check(**settings: Any) -> None:
    """ValueError (one line) for a setting of Algorithm 1 out of its range; absent settings are not checked."""
    tau, alpha, beta = settings.get("tau", 1), settings.get("alpha", 1.0), settings.get("beta", 0.0)
    if isinstance(tau, bool) or not isinstance(tau, int) or tau < 1:
        raise ValueError(f"tau must be an integer >= 1 (inner steps per outer step), got {tau!r}")
    if not alpha > 0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number > 0 (slow learning rate; the paper uses 1.0), got {alpha!r}")
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1) (slow momentum; the paper tunes it in 0.4-0.8), got {beta!r}")
    if settings.get("pseudo_gradient", "scaled") not in PSEUDO_GRADIENTS:
        raise ValueError(
            f"pseudo_gradient must be 'scaled' (SlowMo) or 'raw' (BMUF/DiLoCo), got {settings['pseudo_gradient']!r}"
        )
