"""A plain-NumPy reference of Algorithm 1 and of the base algorithms, written from the papers' equations and sharing
no code with the rest of the package: run the engine on the same problem and compare (the tests do, to ~1e-15).

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
SlowMo's settings (tau, alpha, beta, nesterov, pseudo_gradient, base_buffers), None for none. At the inner step
that ends an outer iteration no gossip round is made (the exact average that follows overwrites it); OSGP's last
messages are taken in before that average.

    from slowmo.reference import Problem, make_data, reference
    theta = reference(Problem("push_sum", outer=dict(tau=4, beta=0.5)))   # (ranks, d + 1)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np


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


def _exponential_offset(n: int, k: int) -> int:
    levels = max(1, math.ceil(math.log2(n)))
    return 2 ** (k % levels)


def _exponential_matrix(s: Problem, k: int) -> np.ndarray:
    """Node i sends half of its mass to node i + 2^(k mod ceil(log2 nodes)); ranks shift by that many nodes."""
    n = s.world_size
    off = _exponential_offset(n // s.procs_per_node, k) * s.procs_per_node
    matrix = 0.5 * np.eye(n)
    for r in range(n):
        matrix[(r + off) % n, r] += 0.5
    return matrix


def reference(s: Problem) -> np.ndarray:
    """Algorithm 1 (and the base algorithm of ``s.mixing``) on every rank, in plain NumPy; returns theta per rank,
    shape (n, d + 1)."""
    a, y, theta0 = make_data(s)
    n, dim = s.world_size, s.d + 1
    theta = np.tile(theta0, (n, 1))
    weight = np.ones(n)
    buf = [None] * n
    x0, u = np.tile(theta0, (n, 1)), np.zeros((n, dim))
    second, t_adam = np.zeros((n, dim)), np.zeros(dim)  # outer Adam's v and its step count (per value)
    residual, previous = np.zeros((n, dim)), np.zeros((n, dim))  # error feedback's e_i; eager's Delta_i^{t-1}
    pending = None  # OSGP: the [x, w] shares sent to each rank at the previous step
    cfg = s.outer
    streaming = cfg is not None and (
        cfg.get("fragments", 1) > 1 or cfg.get("sync_delay", 0) > 0 or cfg.get("fragment_mix", 1.0) != 1.0
    )
    in_flight: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}  # streaming: fragment -> (step, Delta_bar, lr)
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
            if streaming:
                raise ValueError("the reference streams fragments over Local SGD and AR-SGD only")
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
        if streaming:
            theta, x0, u, second, t_adam, buf = _stream(s, k, lr, theta, x0, u, second, t_adam, buf, in_flight)
        elif outer:  # x0, u, second: one row per rank (equal rows, but under eager updates)
            alpha, beta = cfg.get("alpha", 1.0), cfg.get("beta", 0.0)
            raw = cfg.get("pseudo_gradient", "scaled") == "raw"
            compression = cfg.get("compression", "none")
            if cfg.get("eager", False):  # this rank's fresh Delta_i^t, the others' Delta_j^{t-1}
                fresh = x0 - theta
                delta = (fresh + (previous.sum(axis=0) - previous)) / n
                previous = fresh
            elif compression == "none" or s.mixing == "gradient_mean":  # (equal replicas: nothing to compress)
                delta = np.tile(x0[0] - theta.mean(axis=0), (n, 1))
            else:
                sent = x0 - theta + residual
                mean, decoded = _compressed_mean(sent, compression)
                delta = np.tile(mean, (n, 1))
                residual = sent - decoded if cfg.get("error_feedback", False) else residual
            if cfg.get("clip_norm") is not None:
                norms = np.linalg.norm(delta, axis=1, keepdims=True)
                delta = delta * np.minimum(1.0, cfg["clip_norm"] / (norms + 1e-6))
            disp = delta if raw else delta / lr  # the gradient of the outer step
            outer_lr = alpha if raw else alpha * lr
            optimizer = cfg.get("outer_optimizer", "sgd")
            if optimizer == "adam":  # Kingma & Ba, with bias correction
                t_adam = t_adam + 1
                beta2, eps = cfg.get("adam_beta2") or 0.999, cfg.get("adam_eps") or 1e-8
                u = beta * u + (1 - beta) * disp
                second = beta2 * second + (1 - beta2) * disp**2
                m_hat, v_hat = u / (1 - beta**t_adam), second / (1 - beta2**t_adam)
                x0 = x0 - outer_lr * m_hat / (np.sqrt(v_hat) + eps)
            else:  # sgd (nesterov=True: its Nesterov form) or nesterov: heavy-ball momentum on the outer gradient
                u = beta * u + disp
                nesterov = cfg.get("nesterov", False) or optimizer == "nesterov"
                x0 = x0 - outer_lr * (beta * u + disp if nesterov else u)
            theta = x0.copy()
            weight = np.ones(n)
            policy = cfg.get("base_buffers", "keep")
            if policy == "reset" and s.momentum:
                buf = [np.zeros(dim) for _ in range(n)]
            elif policy == "average" and s.momentum:
                mean = np.mean(buf, axis=0)
                buf = [mean.copy() for _ in range(n)]
    return theta


def _stream(s: Problem, k, lr, theta, x0, u, second, t_adam, buf, in_flight):
    """Streaming fragments (Douillard et al. 2025, arXiv 2501.18512) after inner step k: parameter j (here x, then
    c) is in fragment j mod P; fragment p's mean pseudo-gradient is taken after the steps k with (k + 1) mod tau =
    p tau / P and applied d = sync_delay steps later, mixed: x_p <- mix x~_p + (1 - mix) x_p, x_{0,p} <- x~_p."""
    cfg, n = s.outer, s.world_size
    tau, fragments, delay = cfg["tau"], cfg.get("fragments", 1), cfg.get("sync_delay", 0)
    alpha, beta, mix = cfg.get("alpha", 1.0), cfg.get("beta", 0.0), cfg.get("fragment_mix", 1.0)
    raw = cfg.get("pseudo_gradient", "scaled") == "raw"
    members = [np.arange(s.d), np.array([s.d])]  # the parameters' values: x, c
    values = {
        p: np.concatenate([members[j] for j in range(len(members)) if j % fragments == p]) for p in range(fragments)
    }
    due = [p for p in range(fragments) if (k + 1) % tau == p * tau // fragments]
    for p in due:  # launch: the mean over ranks of x_{0,p} - x^i_p
        e = values[p]
        in_flight[p] = (k, (x0[:, e] - theta[:, e]).sum(axis=0) / n, lr[e])
    for p in sorted(in_flight):
        start, delta, gamma = in_flight[p]
        if start + delay != k:
            continue
        del in_flight[p]
        e = values[p]
        if cfg.get("clip_norm") is not None:
            delta = delta * min(1.0, cfg["clip_norm"] / (np.linalg.norm(delta) + 1e-6))
        disp = delta if raw else delta / gamma
        outer_lr = alpha if raw else alpha * gamma
        optimizer = cfg.get("outer_optimizer", "sgd")
        if optimizer == "adam":
            t_adam = t_adam.copy()
            t_adam[e] += 1
            beta2, eps = cfg.get("adam_beta2") or 0.999, cfg.get("adam_eps") or 1e-8
            u[:, e] = beta * u[:, e] + (1 - beta) * disp
            second[:, e] = beta2 * second[:, e] + (1 - beta2) * disp**2
            m_hat, v_hat = u[:, e] / (1 - beta ** t_adam[e]), second[:, e] / (1 - beta2 ** t_adam[e])
            new = x0[:, e] - outer_lr * m_hat / (np.sqrt(v_hat) + eps)
        else:
            u[:, e] = beta * u[:, e] + disp
            nesterov = cfg.get("nesterov", False) or optimizer == "nesterov"
            new = x0[:, e] - outer_lr * (beta * u[:, e] + disp if nesterov else u[:, e])
        theta[:, e] = mix * new + (1 - mix) * theta[:, e]
        x0[:, e] = new
        policy = cfg.get("base_buffers", "keep")
        if s.momentum and policy != "keep":
            mean = np.mean([b[e] for b in buf], axis=0)
            for r in range(n):
                buf[r] = buf[r].copy()
                buf[r][e] = 0.0 if policy == "reset" else mean
    return theta, x0, u, second, t_adam, buf


# ------------------------------------------------------------------------------------------------ compression
CHUNK = 256  # values per scale


def _round_float32(values: np.ndarray) -> np.ndarray:
    """float64 -> float32, as torch converts before any narrower float format."""
    return values.astype(np.float32).astype(np.float64)


def _bf16(values: np.ndarray) -> np.ndarray:
    """Round to bfloat16 (8 significant bits, to nearest, ties to even) through float32's bit pattern."""
    bits = _round_float32(values).astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def _e4m3(values: np.ndarray) -> np.ndarray:
    """Round to float8 e4m3 (3 mantissa bits, exponents down to -6, subnormals spaced 2^-9; |v| <= 448 here)."""
    v = _round_float32(values)
    exponent = np.floor(np.log2(np.maximum(np.abs(v), 2.0**-6)))
    spacing = 2.0 ** (exponent - 3)
    return np.rint(v / spacing) * spacing


def _e2m1(values: np.ndarray) -> np.ndarray:
    """Round to FP4 e2m1 (|v| <= 6): the nearest of 0, 0.5, 1, 1.5, 2, 3, 4, 6 (codes 0-7), a tie to the even code."""
    grid = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    out = np.empty_like(values)
    for i, v in enumerate(values):
        distance = np.abs(grid - abs(v))
        nearest = [code for code in range(8) if distance[code] == distance.min()]
        code = nearest[0] if len(nearest) == 1 else next(c for c in nearest if c % 2 == 0)
        out[i] = -grid[code] if v < 0 else grid[code]
    return out


def _roundtrip(values: np.ndarray, compression: str) -> np.ndarray:
    """D(Q(values)) of one shard, from the definitions in slowmo.compress's docstring."""
    if compression == "fp16":
        return _round_float32(values).astype(np.float16).astype(np.float64)
    if compression == "bf16":
        return _bf16(values)
    top = {"int8": 127.0, "fp8": 448.0, "fp4": 6.0}[compression]
    rounding = {"int8": np.rint, "fp8": _e4m3, "fp4": _e2m1}[compression]
    out = np.empty_like(values)
    for start in range(0, len(values), CHUNK):
        chunk = values[start : start + CHUNK]
        scale = float(np.float32(np.abs(chunk).max() / top))
        scaled = chunk / scale if scale > 0 else chunk
        codes = np.clip(rounding(np.clip(scaled, -top, top)), -top, top)
        out[start : start + CHUNK] = codes * scale
    return out


def _compressed_mean(sent: np.ndarray, compression: str) -> tuple[np.ndarray, np.ndarray]:
    """The two-phase compressed mean over the ranks of ``sent`` (ranks, dim): every shard of every rank's vector
    decoded and added in rank order, the mean re-encoded; returns (that mean, each rank's decoded vector)."""
    n, dim = sent.shape
    length = -(-dim // n)
    padded = np.zeros((n, n * length))
    padded[:, :dim] = sent
    decoded = np.stack(
        [
            np.concatenate([_roundtrip(row[j * length : (j + 1) * length], compression) for j in range(n)])
            for row in padded
        ]
    )
    total = decoded[0].copy()
    for row in decoded[1:]:
        total = total + row
    mean = total / n
    mean = np.concatenate([_roundtrip(mean[j * length : (j + 1) * length], compression) for j in range(n)])
    return mean[:dim], decoded[:, :dim]
