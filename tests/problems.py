"""A least-squares problem with different data on every rank, run through the engine (``run_engine``) and through
an independent plain-NumPy implementation of the same algorithms (``reference``).

The model has two parameters in two param groups with different learning rates (x: a vector, c: a scalar bias),
so per-group gamma_t is exercised. Each rank r at inner step k uses its own minibatch A[r, k], y[r, k]; the loss
is 0.5 * mean((A x + c - y)^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

import slowmo


@dataclass(frozen=True)
class Setup:
    algorithm: str = "localsgd"  # allreduce | localsgd | sgp | osgp
    world_size: int = 4
    steps: int = 12
    period: int | None = None  # LocalSGD's H
    slowmo: dict | None = field(default=None)  # SlowMo kwargs; None: DistributedOptimizer (no outer step)
    momentum: float = 0.0
    nesterov: bool = False
    lr: tuple[float, float] = (0.05, 0.02)
    decay_at: int | None = None  # lr halves from this inner step on
    d: int = 5
    batch: int = 8
    seed: int = 0
    procs_per_node: int = 1
    graph: type | None = None  # gossip graph class; None: the default (directed exponential)

    def with_(self, **kw) -> "Setup":
        return replace(self, **kw)


def make_data(s: Setup):
    rng = np.random.default_rng(s.seed)
    a = rng.normal(size=(s.world_size, s.steps, s.batch, s.d))
    x_true = rng.normal(size=(s.world_size, s.d))  # different optimum per rank: heterogeneous data
    y = np.einsum("rkbd,rd->rkb", a, x_true) + 0.1 * rng.normal(size=(s.world_size, s.steps, s.batch))
    theta0 = rng.normal(size=s.d + 1)
    return a, y, theta0


def lr_at(s: Setup, k: int) -> np.ndarray:
    """Per-element lr of theta = [x (d values), c] at inner step k."""
    scale = 0.5 if s.decay_at is not None and k >= s.decay_at else 1.0
    return np.array([s.lr[0] * scale] * s.d + [s.lr[1] * scale])


class LeastSquares(torch.nn.Module):
    def __init__(self, theta0: np.ndarray) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(torch.tensor(theta0[:-1], dtype=torch.float64))
        self.c = torch.nn.Parameter(torch.tensor(theta0[-1], dtype=torch.float64))

    def loss(self, a: np.ndarray, y: np.ndarray) -> torch.Tensor:
        pred = torch.from_numpy(a) @ self.x + self.c
        return 0.5 * (pred - torch.from_numpy(y)).pow(2).mean()

    def theta(self) -> np.ndarray:
        return np.concatenate([self.x.detach().numpy().copy(), [self.c.item()]])


def build(comm, s: Setup, theta0: np.ndarray):
    model = LeastSquares(theta0)
    base = torch.optim.SGD([{"params": [model.x], "lr": s.lr[0]}, {"params": [model.c], "lr": s.lr[1]}],
                           lr=s.lr[0], momentum=s.momentum, nesterov=s.nesterov)
    if s.algorithm == "allreduce":
        algorithm = slowmo.AllReduce(comm, procs_per_node=s.procs_per_node)
    elif s.algorithm == "localsgd":
        algorithm = slowmo.LocalSGD(comm, period=s.period, procs_per_node=s.procs_per_node)
    else:
        graph = s.graph(comm.world_size // s.procs_per_node) if s.graph else None
        algorithm = {"sgp": slowmo.SGP, "osgp": slowmo.OSGP}[s.algorithm](comm, graph, s.procs_per_node)
    if s.slowmo is None:
        opt = slowmo.DistributedOptimizer(model, base, algorithm)
    else:
        opt = slowmo.SlowMo(model, base, algorithm, **s.slowmo)
    return model, opt


def train(model, opt, s: Setup, data, start: int, stop: int, comm, history: list | None = None) -> None:
    a, y, _ = data
    for k in range(start, stop):
        lrs = lr_at(s, k)
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = float(lrs[0]), float(lrs[-1])
        opt.zero_grad()
        model.loss(a[comm.rank, k], y[comm.rank, k]).backward()
        opt.step()
        if history is not None:
            weight = getattr(opt.algorithm, "weight", torch.ones(1)).item()
            history.append((model.theta(), weight))


def run_engine(comm, s: Setup, with_history: bool = False) -> dict:
    """Run the setup on this rank; returns final theta, push-sum weight, byte stats (and per-step history)."""
    data = make_data(s)
    model, opt = build(comm, s, data[2])
    history: list = []
    train(model, opt, s, data, 0, s.steps, comm, history if with_history else None)
    out = {"theta": model.theta(), "stats": comm.stats(), "history": history,
           "weight": getattr(opt.algorithm, "weight", torch.ones(1)).item()}
    opt.algorithm.flush()  # receive OSGP's last messages, so that a later run on this communicator starts clean
    comm.reset_stats()
    return out


# ------------------------------------------------------------------------------------------------ reference
def _exponential_offset(n: int, k: int) -> int:
    levels = max(1, math.ceil(math.log2(n)))
    return 2 ** (k % levels)


def reference(s: Setup) -> np.ndarray:
    """Plain-NumPy Algorithm 1 (and base algorithms) on every rank; returns theta per rank, shape (n, d+1).

    Written from the paper's equations, sharing no code with the package."""
    a, y, theta0 = make_data(s)
    n, dim = s.world_size, s.d + 1
    theta = np.tile(theta0, (n, 1))
    weight = np.ones(n)
    buf = [None] * n
    x0, u = theta0.copy(), np.zeros(dim)
    pending = None  # OSGP: (numerators sent at the previous step, to whom)
    cfg = s.slowmo
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
            grads = [np.mean(grads[r - r % p:r - r % p + p], axis=0) for r in range(n)]
        for r in range(n):  # torch.optim.SGD semantics
            g = grads[r]
            if s.momentum:
                buf[r] = g.copy() if buf[r] is None else s.momentum * buf[r] + g
                g = g + s.momentum * buf[r] if s.nesterov else buf[r]
            theta[r] = theta[r] - lr * g
        outer = cfg is not None and (k + 1) % cfg["tau"] == 0
        if s.algorithm == "localsgd" and s.period and (k + 1) % s.period == 0 and not outer:
            theta[:] = theta.mean(axis=0)
        if s.algorithm in ("sgp", "osgp"):
            # node i sends to node i + 2^(k mod ceil(log2 nodes)): ranks shift by that many nodes
            off = _exponential_offset(n // s.procs_per_node, k) * s.procs_per_node
            num = np.concatenate([theta * weight[:, None], weight[:, None]], axis=1) * 0.5  # keep 1/2, send 1/2
            sent = num.copy()
            if s.algorithm == "sgp":
                num = num + np.roll(sent, off, axis=0)  # rank r receives from r - off
            elif pending is not None:
                num = num + pending
            if s.algorithm == "osgp":
                pending = np.roll(sent, off, axis=0)
            weight = num[:, -1].copy()
            theta = num[:, :-1] / weight[:, None]
        if outer:
            if s.algorithm == "osgp" and pending is not None:
                num = np.concatenate([theta * weight[:, None], weight[:, None]], axis=1) + pending
                pending = None
                weight = num[:, -1].copy()
                theta = num[:, :-1] / weight[:, None]
            x_tau = theta.mean(axis=0)
            alpha, beta = cfg.get("alpha", 1.0), cfg.get("beta", 0.0)
            raw = cfg.get("pseudo_gradient", "scaled") == "raw"
            disp = (x0 - x_tau) if raw else (x0 - x_tau) / lr
            u = beta * u + disp
            step_dir = beta * u + disp if cfg.get("nesterov", False) else u
            x0 = x0 - (alpha if raw else alpha * lr) * step_dir
            theta = np.tile(x0, (n, 1))
            weight = np.ones(n)
            policy = cfg.get("base_buffers", "keep")
            if policy == "reset" and s.momentum:
                buf = [np.zeros(dim) for _ in range(n)]
            elif policy == "average" and s.momentum:
                mean = np.mean(buf, axis=0)
                buf = [mean.copy() for _ in range(n)]
    return theta
