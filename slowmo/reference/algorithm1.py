"""Algorithm 1 (Wang, Tantia, Ballas & Rabbat, ICLR 2020) over the four base algorithms, in plain NumPy, written from
the papers' equations and sharing no code with the rest of the package: run the engine on the same problem and
compare (the tests do, to ~1e-15).

The problem: least squares, 0.5 * mean((A x + c - y)^2), with different data on every rank (rank r at inner step k
uses its own minibatch A[r, k], y[r, k]) and two parameters in two param groups with different lrs (x, a vector;
c, a scalar bias), so that per-group gamma_t is exercised. The base optimizer is torch.optim.SGD (momentum,
Nesterov). ``algorithm`` is the base algorithm, by the communication it does:

- ``allreduce``: the gradient averaged over all ranks before every step (AR-SGD);
- ``localsgd``: the parameters averaged every ``period`` steps (Local SGD; None: only the outer step's average);
- ``sgp``: push-sum gossip (SGP, Assran et al. 2019, Algorithm 1): the gradient at z = x / w, the base
  optimizer's step on the numerator x, then (x, w) <- P(k) (x, w) with P(k) column-stochastic; by default the
  time-varying directed exponential graph (keep 1/2, send 1/2), or any ``mixing_matrix`` k -> P(k) over the ranks;
- ``osgp``: the same, each message mixed one step late (OSGP): a rank keeps its diagonal share at step k
  and adds the off-diagonal shares sent to it at step k - 1.

``procs_per_node`` > 1 averages gradients inside nodes of consecutive ranks and gossips between nodes. ``outer`` is
SlowMo's settings, in the words of the harness's ``slowmo`` section: ``tau``, ``base_buffers`` and the update's knobs
under ``update`` (alpha, beta, nesterov, pseudo_gradient); None for no outer step. At the inner step that ends an outer
iteration no gossip round is made (the exact average that follows overwrites it); OSGP's last messages are taken in
before that average. The outer step is one hook, :class:`Algorithm1` by default; the parts beyond Algorithm 1 (other
updates and means, fragments, clipping) are :mod:`.beyond`'s hook, which this file does not know of.

    from slowmo.reference import Problem, make_data, reference
    theta = reference(Problem("sgp", outer=dict(tau=4, update=dict(beta=0.5))))   # (ranks, d + 1)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

ALGORITHM_1 = {"tau", "base_buffers", "update"}  # the settings of Algorithm 1 (the update: slow momentum's knobs)
SLOW_MOMENTUM = {"alpha", "beta", "nesterov", "pseudo_gradient"}


@dataclass(frozen=True)
class Problem:
    algorithm: str  # allreduce | localsgd | sgp | osgp
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


def within(outer: dict) -> bool:
    """Whether the outer settings are Algorithm 1's alone (slow momentum, the exact mean, the whole model at once)."""
    update = outer.get("update", {})
    return (
        set(outer) <= ALGORITHM_1
        and set(update) <= SLOW_MOMENTUM | {"name"}
        and update.get("name", "slow_momentum") == "slow_momentum"
    )


class Algorithm1:
    """Algorithm 1's outer step after each inner step that ends a round: the exact average, the slow momentum step,
    every rank from x_{t+1,0} (push-sum's weights back to 1), the base buffers kept, reset or averaged."""

    def __init__(self, s: Problem, theta0: np.ndarray) -> None:
        if not within(s.outer):
            raise ValueError(f"settings beyond Algorithm 1 in {s.outer}: use slowmo.reference.beyond's outer step")
        self.s, self.tau, self.update = s, s.outer["tau"], s.outer.get("update", {})
        self.x0, self.u = theta0.copy(), np.zeros_like(theta0)

    def after_step(self, k: int, lr: np.ndarray, theta: np.ndarray, weight: np.ndarray, buf: list):
        if (k + 1) % self.tau:
            return theta, weight, buf
        n, get = len(theta), self.update.get
        delta = self.x0 - theta.mean(axis=0)
        raw = get("pseudo_gradient", "scaled") == "raw"
        self.x0, self.u = slow_momentum(
            self.x0, self.u, delta, lr, get("alpha", 1.0), get("beta", 0.0), get("nesterov", False), raw
        )
        buf = base_buffers(self.s.outer.get("base_buffers", "keep"), buf, self.s.momentum, np.arange(len(self.x0)))
        return np.tile(self.x0, (n, 1)), np.ones(n), buf


def reference(s: Problem, outer_step: type = Algorithm1) -> np.ndarray:
    """The base algorithm of ``s.algorithm`` on every rank, and after each inner step the ``outer_step`` hook (built as
    ``outer_step(s, theta0)``, its ``after_step`` given the step, the lrs, theta, the push-sum weights and the base
    buffers, and returning the last three): Algorithm 1's by default. Returns theta per rank, shape (n, d + 1)."""
    a, y, theta0 = make_data(s)
    n = s.world_size
    theta, weight, buf = np.tile(theta0, (n, 1)), np.ones(n), [None] * n
    pending = None  # OSGP: the [x, w] shares sent to each rank at the previous step
    cfg = s.outer
    hook = outer_step(s, theta0) if cfg is not None else None
    for k in range(s.steps):
        lr = lr_at(s, k)
        grads = []
        for r in range(n):
            resid = a[r, k] @ theta[r, :-1] + theta[r, -1] - y[r, k]
            grads.append(np.concatenate([a[r, k].T @ resid, [resid.sum()]]) / s.batch)
        if s.algorithm == "allreduce":
            grads = [np.mean(grads, axis=0)] * n
        elif s.procs_per_node > 1:  # gradient mean inside each node of procs_per_node consecutive ranks
            p = s.procs_per_node
            grads = [np.mean(grads[r - r % p : r - r % p + p], axis=0) for r in range(n)]
        push_sum = s.algorithm in ("sgp", "osgp")
        if push_sum:  # the base step acts on the numerator x = z w, the gradient having been taken at z
            theta = theta * weight[:, None]
        for r in range(n):  # torch.optim.SGD semantics
            g = grads[r]
            if s.momentum:
                buf[r] = g.copy() if buf[r] is None else s.momentum * buf[r] + g
                g = g + s.momentum * buf[r] if s.nesterov else buf[r]
            theta[r] = theta[r] - lr * g
        outer = cfg is not None and (k + 1) % cfg["tau"] == 0
        if s.algorithm == "localsgd" and s.period and (k + 1) % s.period == 0 and not outer:
            theta[:] = theta.mean(axis=0)
        if push_sum:
            num = np.concatenate([theta, weight[:, None]], axis=1)  # [x, w] per rank
            if not outer:  # an exact average follows an outer step's last inner step: no gossip round then
                p = s.mixing_matrix(k) if s.mixing_matrix is not None else _exponential_matrix(s, k)
                if s.algorithm == "sgp":
                    num = p @ num
                else:  # kept now; the shares sent now arrive at the next step
                    kept = np.diag(p)[:, None] * num
                    num, pending = kept + (pending if pending is not None else 0.0), (p - np.diag(np.diag(p))) @ num
            elif s.algorithm == "osgp" and pending is not None:  # the last messages, taken in first
                num, pending = num + pending, None
            weight = num[:, -1].copy()
            theta = num[:, :-1] / weight[:, None]
        if hook is not None:
            theta, weight, buf = hook.after_step(k, lr, theta, weight, buf)
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
