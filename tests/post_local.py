"""The post-local SGD tests' problem, runners and NumPy reference (engine/test_post_local.py on simulated ranks,
system/test_post_local_on_gloo.py on gloo against PyTorch's own): LocalSGD(period=H, warmup_steps=K) takes the gradient
mean over all ranks at inner steps k < K, then local steps with the parameter average after steps k >= K with
(k + 1) % H == 0."""

import io

import numpy as np
import torch
from torch import nn

import slowmo

from problems import Setup, lr_at, make_data, outer

N = 4


THETA_BYTES = (5 + 1) * 8  # |theta| = 6 float64 values


def ring(nbytes: int, n: int = N) -> int:
    return 2 * (n - 1) * nbytes // n


class Tiny(nn.Module):
    """Least squares 0.5 * mean((A x + c - y)^2), x and c in two param groups; forward gives the loss (for DDP)."""

    def __init__(self, theta0: np.ndarray) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(theta0[:-1], dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor(theta0[-1], dtype=torch.float64))

    def forward(self, a: np.ndarray, y: np.ndarray) -> torch.Tensor:
        return 0.5 * (torch.from_numpy(a) @ self.x + self.c - torch.from_numpy(y)).pow(2).mean()

    def theta(self) -> np.ndarray:
        return np.concatenate([self.x.detach().numpy().copy(), [self.c.item()]])


def _base(model: Tiny, s: Setup) -> torch.optim.SGD:
    groups = [{"params": [model.x], "lr": s.lr[0]}, {"params": [model.c], "lr": s.lr[1]}]
    return torch.optim.SGD(groups, lr=s.lr[0], momentum=s.momentum, nesterov=s.nesterov)


def _build(comm, s: Setup, warmup: int | None, theta0: np.ndarray):
    """The engine; ``warmup`` None: LocalSGD built without the argument."""
    model = Tiny(theta0)
    kw = {} if warmup is None else {"warmup_steps": warmup}
    algorithm = slowmo.LocalSGD(comm, period=s.period, procs_per_node=s.procs_per_node, **kw)
    if s.outer is None:
        return model, slowmo.DistributedOptimizer(model, _base(model, s), algorithm)
    return model, slowmo.SlowMo(model, _base(model, s), algorithm, **outer(s.outer))


def _set_lr(opt, s: Setup, k: int) -> None:
    lrs = lr_at(s, k)
    opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = float(lrs[0]), float(lrs[-1])


def _train(model, opt, s: Setup, data, rank: int, start: int, stop: int, history: list | None = None) -> None:
    a, y, _ = data
    for k in range(start, stop):
        _set_lr(opt, s, k)
        opt.zero_grad()
        model(a[rank, k], y[rank, k]).backward()
        opt.step()
        if history is not None:
            history.append(model.theta())


def _run(comm, s: Setup, warmup: int | None) -> dict:
    data = make_data(s)
    model, opt = _build(comm, s, warmup, data[2])
    history: list = []
    _train(model, opt, s, data, comm.rank, 0, s.steps, history)
    out = {"history": np.stack(history), "stats": comm.stats(), "state": opt.algorithm.state_dict()}
    comm.reset_stats()
    return out


def _resumed(comm, s: Setup, warmup: int, stop: int) -> dict:
    """Train to ``stop``, save, build fresh (another init), load, train on: the final theta and the bytes."""
    data = make_data(s)
    model, opt = _build(comm, s, warmup, data[2])
    _train(model, opt, s, data, comm.rank, 0, stop)
    blob = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, blob)
    del model, opt
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    model, opt = _build(comm, s, warmup, data[2] + 1.0)  # everything must come from the checkpoint
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    _train(model, opt, s, data, comm.rank, stop, s.steps)
    out = {"theta": model.theta(), "stats": comm.stats()}
    comm.reset_stats()
    return out


def histories(s: Setup, warmup: int | None, backend: str = "simulated") -> np.ndarray:
    """(steps, ranks, d + 1): every rank's theta after every inner step."""
    ranks = slowmo.comm.spawn(_run, s.world_size, backend, args=(s, warmup))
    return np.stack([r["history"] for r in ranks], axis=1)


# --------------------------------------------------------------------------------------------- the reference
def post_local_reference(s: Setup, warmup: int) -> np.ndarray:
    """Plain NumPy, from the equations: (steps, ranks, d + 1).

    k < K: g^i <- (1/n) sum_j g^j (all ranks); k >= K: g^i local (mean over the node's ranks with procs_per_node p).
    torch.optim.SGD: b <- g (first step) or mu b + g; d = g + mu b (Nesterov) or b; theta <- theta - lr d.
    Average after step k when k >= K, (k + 1) % H == 0 and no outer step follows. SlowMo (Algorithm 1, scaled
    pseudo-gradient) after step k when (k + 1) % tau == 0: u <- beta u + (x0 - mean theta) / lr; x0 <- x0 - alpha lr u;
    every rank restarts from x0.
    """
    a, y, theta0 = make_data(s)
    n, p, dim = s.world_size, s.procs_per_node, s.d + 1
    theta = np.tile(theta0, (n, 1))
    buf = np.zeros((n, dim))
    x0, u = theta0.copy(), np.zeros(dim)
    out = []
    for k in range(s.steps):
        lr = lr_at(s, k)
        resid = np.einsum("rbd,rd->rb", a[:, k], theta[:, :-1]) + theta[:, -1:] - y[:, k]
        g = np.concatenate([np.einsum("rbd,rb->rd", a[:, k], resid), resid.sum(1, keepdims=True)], axis=1) / s.batch
        if k < warmup:
            g = np.tile(g.mean(axis=0), (n, 1))
        elif p > 1:
            g = np.repeat(g.reshape(n // p, p, dim).mean(axis=1), p, axis=0)
        if s.momentum:
            buf = g.copy() if k == 0 else s.momentum * buf + g
            g = g + s.momentum * buf if s.nesterov else buf
        theta = theta - lr * g
        outer = s.outer is not None and (k + 1) % s.outer["tau"] == 0
        if s.period is not None and k >= warmup and (k + 1) % s.period == 0 and not outer:
            theta = np.tile(theta.mean(axis=0), (n, 1))
        if outer:
            u = s.outer["update"].get("beta", 0.0) * u + (x0 - theta.mean(axis=0)) / lr
            x0 = x0 - s.outer["update"].get("alpha", 1.0) * lr * u
            theta = np.tile(x0, (n, 1))
        out.append(theta.copy())
    return np.stack(out)


SGD_M = dict(momentum=0.9, nesterov=True, decay_at=7, steps=14)


CASES = {  # id: (setup, K)
    "H3 K5": (Setup("localsgd", period=3, **SGD_M), 5),
    "H4 K6": (Setup("localsgd", period=4, momentum=0.9, steps=14), 6),
    "H2 K3 slowmo tau4": (Setup("localsgd", period=2, outer=dict(tau=4, update=dict(beta=0.6)), **SGD_M), 3),
    "Hnone K6 slowmo tau4 alpha0.7": (
        Setup("localsgd", outer=dict(tau=4, update=dict(alpha=0.7, beta=0.5)), momentum=0.9, steps=14),
        6,
    ),
    "H3 K4 nodes": (Setup("localsgd", period=3, procs_per_node=2, **SGD_M), 4),
    "H2 K5 nodes slowmo tau4": (
        Setup("localsgd", period=2, procs_per_node=2, outer=dict(tau=4, update=dict(beta=0.6)), **SGD_M),
        5,
    ),
}


# --------------------------------------------------------------------------------------------- bytes
def expected_bytes(s: Setup, warmup: int) -> dict[str, int]:
    """K gradient all-reduces of |theta| over all ranks, one per parameter average (Local SGD's, or SlowMo's exact
    one after the warm-up), the node's gradient mean at every later step; plus the start-up broadcast."""
    tau = s.outer["tau"] if s.outer else None
    averages = 0
    for k in range(s.steps):
        outer = tau is not None and (k + 1) % tau == 0
        local_average = s.period is not None and k >= warmup and (k + 1) % s.period == 0 and not outer
        averages += local_average or (outer and k >= warmup)  # no exact average while the replicas are equal
    out = {"all_reduce": (warmup + averages) * ring(THETA_BYTES)}
    if s.procs_per_node > 1:
        out["node/all_reduce"] = (s.steps - warmup) * ring(THETA_BYTES, s.procs_per_node)
    return out


def check_bytes(stats: list[dict], s: Setup, warmup: int) -> None:
    expected = expected_bytes(s, warmup)
    for rank, st in enumerate(stats):
        st = dict(st)
        assert st.pop("broadcast") == (0 if rank == N - 1 else THETA_BYTES)
        total = st.pop("total")
        assert {k: v for k, v in st.items() if v} == expected
        assert total == sum(expected.values()) + (0 if rank == N - 1 else THETA_BYTES)


def _load_into_warmup(comm):
    s = Setup("localsgd", period=2, steps=3)
    data = make_data(s)
    _, opt = _build(comm, s, 0, data[2])
    state = opt.state_dict()
    _, other = _build(comm, s, 2, data[2])
    other.load_state_dict(state)
