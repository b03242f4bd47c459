"""Algorithm 1 (Wang, Tantia, Ballas & Rabbat, ICLR 2020) over the four base algorithms, in plain NumPy, written from
the papers' equations and sharing no code with the rest of the package: run the engine on the same problem and
compare (the tests do, to ~1e-15).

The problem: least squares, 0.5 * mean((A x + c - y)^2), with different data on every rank (rank r at inner step k
uses its own minibatch A[r, k], y[r, k]) and two parameters in two param groups with different lrs (x, a vector;
c, a scalar bias), so that per-group gamma_t is exercised. The base optimizer is torch.optim.SGD (momentum,
Nesterov). ``mixing`` is the base algorithm's communication:

- ``gradient_mean``: the gradient averaged over all ranks before every step (AR-SGD);
- ``average``: the parameters averaged every ``period`` steps (Local SGD; None: only the outer step's average);
- ``push_sum``: push-sum gossip (SGP, Assran et al. 2019, Algorithm 1): the gradient at z = x / w, the base
  optimizer's step on the numerator x, then (x, w) <- P(k) (x, w) with P(k) column-stochastic; by default the
  time-varying directed exponential graph (keep 1/2, send 1/2), or any ``mixing_matrix`` k -> P(k) over the ranks;
- ``push_sum_late``: the same, each message mixed one step late (OSGP): a rank keeps its diagonal share at step k
  and adds the off-diagonal shares sent to it at step k - 1.

``procs_per_node`` > 1 averages gradients inside nodes of consecutive ranks and gossips between nodes. ``outer`` is
SlowMo's settings (tau, alpha, beta, nesterov, pseudo_gradient, base_buffers; the options beyond Algorithm 1 are
:mod:`.beyond`'s), None for none. At the inner step that ends an outer iteration no gossip round is made (the exact
average that follows overwrites it); OSGP's last messages are taken in before that average.

    from slowmo.reference import Problem, make_data, reference
    theta = reference(Problem("push_sum", outer=dict(tau=4, beta=0.5)))   # (ranks, d + 1)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

ALGORITHM_1 = {"tau", "alpha", "beta", "nesterov", "pseudo_gradient", "base_buffers"}


@dataclass(frozen=True)
class Problem:
    mixing: str  # gradient_mean | average | push_sum | push_sum_late
    world_size: int = 4
    steps: int = 12
    period: int | None = None  # average: H
    outer: dict | None = field(default=None)  # SlowMo's settings; None: no outer step
    momentum: float = 0.0
    nesterov: bool = False
    lr: tuple[float, float] = (0.05, 0.02)
    decay_at: int | None = None  # lr halves from this inner step on
    d: int = 5
    batch: int = 8
    seed: int = 0
    procs_per_node: int = 1
    mixing_matrix: Callable[[int], np.ndarray] | None = None  # push-sum's P(k) over the ranks; None: exponential

    def with_(self, **kw) -> Problem:
        return replace(self, **kw)


def make_data(s: Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A (ranks, steps, batch, d), y (ranks, steps, batch) and the starting point theta0 = [x0, c0]."""
    rng = np.random.default_rng(s.seed)
    a = rng.normal(size=(s.world_size, s.steps, s.batch, s.d))
    x_true = rng.normal(size=(s.world_size, s.d))  # different optimum per rank: heterogeneous data
    y = np.einsum("rkbd,rd->rkb", a, x_true) + 0.1 * rng.normal(size=(s.world_size, s.steps, s.batch))
    theta0 = rng.normal(size=s.d + 1)
    return a, y, theta0


def lr_at(s: Problem, k: int) -> np.ndarray:
    """Per-element lr of theta = [x (d values), c] at inner step k."""
    scale = 0.5 if s.decay_at is not None and k >= s.decay_at else 1.0
    return np.array([s.lr[0] * scale] * s.d + [s.lr[1] * scale])


def _exponential_matrix(s: Problem, k: int) -> np.ndarray:
    """Node i sends half of its mass to node i + 2^(k mod ceil(log2 nodes)); ranks shift by that many nodes."""
    n, nodes = s.world_size, s.world_size // s.procs_per_node
    off = 2 ** (k % max(1, math.ceil(math.log2(nodes)))) * s.procs_per_node
    matrix = 0.5 * np.eye(n)
    for r in range(n):
        matrix[(r + off) % n, r] += 0.5
    return matrix


def slow_momentum(x0, u, delta, gamma, alpha, beta, nesterov=False, raw=False):
    """Algorithm 1's outer update, on the mean pseudo-gradient delta = x_{t,0} - x_{t,tau}; returns (x_{t+1,0}, u):

    u_{t+1} = beta u_t + delta / gamma_t          (raw: + delta)
    x_{t+1,0} = x_{t,0} - alpha gamma_t u_{t+1}   (raw: alpha u_{t+1}; nesterov: beta u_{t+1} + delta / gamma_t)"""
    g, lr = (delta, alpha) if raw else (delta / gamma, alpha * gamma)
    u = beta * u + g
    return x0 - lr * (beta * u + g if nesterov else u), u


def reference(s: Problem) -> np.ndarray:
    """The base algorithm of ``s.mixing`` on every rank, and every tau inner steps Algorithm 1's outer step (or the
    outer step with :mod:`.beyond`'s options); returns theta per rank, shape (n, d + 1)."""
    from .beyond import Beyond  # the options beyond Algorithm 1, beside it

    a, y, theta0 = make_data(s)
    n, dim = s.world_size, s.d + 1
    theta, weight, buf = np.tile(theta0, (n, 1)), np.ones(n), [None] * n
    x0, u = np.tile(theta0, (n, 1)), np.zeros((n, dim))  # one row per rank (equal rows, but under eager updates)
    pending = None  # OSGP: the [x, w] shares sent to each rank at the previous step
    cfg = s.outer
    beyond = Beyond(s, x0) if cfg is not None and set(cfg) - ALGORITHM_1 else None
    for k in range(s.steps):
        lr = lr_at(s, k)
        grads = []
        for r in range(n):
            resid = a[r, k] @ theta[r, :-1] + theta[r, -1] - y[r, k]
            grads.append(np.concatenate([a[r, k].T @ resid, [resid.sum()]]) / s.batch)
        if s.mixing == "gradient_mean":
            grads = [np.mean(grads, axis=0)] * n
        elif s.procs_per_node > 1:  # gradient mean inside each node of procs_per_node consecutive ranks
            p = s.procs_per_node
            grads = [np.mean(grads[r - r % p : r - r % p + p], axis=0) for r in range(n)]
        push_sum = s.mixing in ("push_sum", "push_sum_late")
        if push_sum:  # the base step acts on the numerator x = z w, the gradient having been taken at z
            theta = theta * weight[:, None]
        for r in range(n):  # torch.optim.SGD semantics
            g = grads[r]
            if s.momentum:
                buf[r] = g.copy() if buf[r] is None else s.momentum * buf[r] + g
                g = g + s.momentum * buf[r] if s.nesterov else buf[r]
            theta[r] = theta[r] - lr * g
        outer = cfg is not None and (k + 1) % cfg["tau"] == 0
        if s.mixing == "average" and s.period and (k + 1) % s.period == 0 and not outer:
            theta[:] = theta.mean(axis=0)
        if push_sum:
            num = np.concatenate([theta, weight[:, None]], axis=1)  # [x, w] per rank
            if not outer:  # an exact average follows an outer step's last inner step: no gossip round then
                p = s.mixing_matrix(k) if s.mixing_matrix is not None else _exponential_matrix(s, k)
                if s.mixing == "push_sum":
                    num = p @ num
                else:  # kept now; the shares sent now arrive at the next step
                    kept = np.diag(p)[:, None] * num
                    num, pending = kept + (pending if pending is not None else 0.0), (p - np.diag(np.diag(p))) @ num
            elif s.mixing == "push_sum_late" and pending is not None:  # the last messages, taken in first
                num, pending = num + pending, None
            weight = num[:, -1].copy()
            theta = num[:, :-1] / weight[:, None]
        if beyond is not None:
            theta, weight, buf = beyond.after_step(k, lr, theta, weight, buf)
        elif outer:  # Algorithm 1: the exact average, the slow momentum step, every rank from x_{t+1,0}
            delta = x0[0] - theta.mean(axis=0)
            raw = cfg.get("pseudo_gradient", "scaled") == "raw"
            new, u[:] = slow_momentum(
                x0[0], u[0], delta, lr, cfg.get("alpha", 1.0), cfg.get("beta", 0.0), cfg.get("nesterov", False), raw
            )
            x0[:], theta, weight = new, np.tile(new, (n, 1)), np.ones(n)
            buf = base_buffers(cfg.get("base_buffers", "keep"), buf, s.momentum, np.arange(dim))
    return theta


def base_buffers(policy: str, buf: list, momentum: float, e: np.ndarray) -> list:
    """The base optimizer's momentum of the values ``e``, kept, reset to 0 or averaged over the ranks."""
    if not momentum or policy == "keep":
        return buf
    mean = np.mean([b[e] for b in buf], axis=0)
    out = []
    for b in buf:
        b = b.copy()
        b[e] = 0.0 if policy == "reset" else mean
        out.append(b)
    return out
