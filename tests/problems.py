"""The least-squares problem of :mod:`slowmo.reference` (different data on every rank, two param groups), run
through the engine (``run_engine``) and through the package's independent plain-NumPy reference (``reference``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

import slowmo
from slowmo.outer.parts import MEANS, UPDATES
from slowmo.reference import Problem, algorithm1, beyond, lr_at, make_data  # noqa: F401 - make_data and lr_at are the tests' too


@dataclass(frozen=True)
class Setup(Problem):
    """A :class:`~slowmo.reference.Problem` (its ``outer`` in the words of the harness's ``slowmo`` section: ``tau``,
    ``base_buffers``, ``clip_norm`` and the parts' sections ``update``, ``mean``, ``fragments``),
    run through the engine too; ``graph``: a gossip graph class of the engine (its push-sum matrix the reference's)."""

    algorithm: str = "localsgd"
    graph: type | None = None  # None: the default (directed exponential)

    def __post_init__(self) -> None:
        if self.graph is not None:
            if self.procs_per_node > 1:
                raise ValueError("the reference gossips between nodes on the directed exponential graph only")
            object.__setattr__(self, "mixing_matrix", uniform_mixing(self.graph(self.world_size)))


def uniform_mixing(graph: slowmo.GossipGraph):
    """k -> P(k) of uniform push-sum on ``graph``, written here from its out-peers: rank i keeps 1/(d_i + 1) of its
    mass and sends 1/(d_i + 1) to each of its d_i out-peers (column i of P)."""

    def matrix(k: int) -> np.ndarray:
        p = np.zeros((graph.world_size, graph.world_size))
        for i in range(graph.world_size):
            targets = [i, *graph.out_peers(i, k)]
            p[targets, i] = 1.0 / len(targets)
        return p

    return matrix


class Uneven(slowmo.GossipGraph):
    """Irregular and time-varying: at step k rank r sends to r + 1 and, when r + k is even, also to r + 2 (mod n).
    Out-degrees 1 or 2, in-degrees 0 to 2: the push-sum weights move away from 1."""

    def out_peers(self, rank: int, step: int) -> list[int]:
        n = self.world_size
        return [(rank + 1) % n] + ([(rank + 2) % n] if (rank + step) % 2 == 0 else [])

    def in_peers(self, rank: int, step: int) -> list[int]:
        return sorted(j for j in range(self.world_size) if rank in self.out_peers(j, step))


def reference(s: Setup) -> np.ndarray:
    """The plain-NumPy reference (slowmo.reference, written from the papers' equations): Algorithm 1's own where the
    settings are Algorithm 1's, else with the outer step of the parts beyond it."""
    plain = s.outer is None or algorithm1.within(s.outer)
    return algorithm1.reference(s) if plain else beyond.reference(s)


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
    base = torch.optim.SGD(
        [{"params": [model.x], "lr": s.lr[0]}, {"params": [model.c], "lr": s.lr[1]}],
        lr=s.lr[0],
        momentum=s.momentum,
        nesterov=s.nesterov,
    )
    if s.algorithm == "allreduce":
        algorithm = slowmo.AllReduce(comm, procs_per_node=s.procs_per_node)
    elif s.algorithm == "localsgd":
        algorithm = slowmo.LocalSGD(comm, period=s.period, procs_per_node=s.procs_per_node)
    else:
        graph = s.graph(comm.world_size // s.procs_per_node) if s.graph else None
        algorithm = {"sgp": slowmo.SGP, "osgp": slowmo.OSGP}[s.algorithm](comm, graph, s.procs_per_node)
    if s.outer is None:
        opt = slowmo.DistributedOptimizer(model, base, algorithm)
    else:
        # streaming fragments deal layers: x and c, one module's, are two layers when given as a list
        streamed = s.outer.get("fragments", {}).get("count", 1) > 1
        opt = slowmo.SlowMo([model.x, model.c] if streamed else model, base, algorithm, **outer(s.outer))
    return model, opt


def outer(settings: dict) -> dict:
    """SlowMo's arguments (tau, the parts, the base-buffer policy, where the outer state lives) from the ``slowmo``
    section's words: each part built by its registry from its section (slow momentum and the exact mean where none is
    named)."""
    unknown = set(settings) - {"tau", "base_buffers", "clip_norm", "update", "mean", "fragments", "state_device"}
    assert not unknown, f"not a setting of the slowmo section: {unknown}"
    update, mean = dict(settings.get("update", {})), dict(settings.get("mean", {}))
    update, mean = (
        UPDATES[update.pop("name", "slow_momentum")].build(**update),
        MEANS[mean.pop("name", "exact")].build(**mean),
    )
    clip = settings.get("clip_norm")
    return dict(
        tau=settings["tau"],
        update=update,
        mean=mean,
        fragments=slowmo.Fragments(**settings.get("fragments", {})),
        clip=None if clip is None else slowmo.ClipNorm(clip),
        base_buffers=settings.get("base_buffers", "keep"),
        state_device=settings.get("state_device"),
    )


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
    out = {
        "theta": model.theta(),
        "stats": comm.stats(),
        "history": history,
        "weight": getattr(opt.algorithm, "weight", torch.ones(1)).item(),
    }
    opt.algorithm.flush()  # receive OSGP's last messages, so that a later run on this communicator starts clean
    comm.reset_stats()
    return out


def run_clearing_grads(comm, s: Setup, how: str) -> dict:
    """``run_engine``'s loop, with the gradients cleared ``how`` a user's loop might: ``optimizer`` (opt.zero_grad()),
    ``model`` (model.zero_grad(set_to_none=False), in place), ``none`` (p.grad = None) or ``by hand`` (the gradients
    computed by torch.autograd.grad and assigned to p.grad, no backward pass)."""
    a, y, theta0 = make_data(s)
    model, opt = build(comm, s, theta0)
    for k in range(s.steps):
        lrs = lr_at(s, k)
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = float(lrs[0]), float(lrs[-1])
        if how == "optimizer":
            opt.zero_grad()
        elif how == "model":
            model.zero_grad(set_to_none=False)
        elif how == "none":
            for p in model.parameters():
                p.grad = None
        loss = model.loss(a[comm.rank, k], y[comm.rank, k])
        if how == "by hand":
            model.x.grad, model.c.grad = torch.autograd.grad(loss, [model.x, model.c])
        else:
            loss.backward()
        opt.step()
    return {"theta": model.theta()}
