"""Stochastic Gradient Push (SGP) and its overlapped variant (OSGP), Assran et al. 2019, Algorithm 1.

Push-sum: every rank holds a numerator x and a weight w (w = 1 at the start and after every exact average); the
model holds the de-biased z = x / w, at which the gradient is taken. The base optimizer's update is applied to the
numerator, as the paper writes it and as its official code (and fairscale's) does, and then (x, w) is mixed, with
P(k) the graph's column-stochastic mixing matrix at inner step k:

    x^i_{k+1/2} = x^i_k - gamma d^i_k,   d^i_k the base optimizer's direction from grad F_i(z^i_k)
    x^i_{k+1} = sum_j P(k)[i, j] x^j_{k+1/2},   w^i_{k+1} = sum_j P(k)[i, j] w^j_k,   z^i_{k+1} = x^i_{k+1} / w^i_{k+1}

The model holds x during the base step (z times w, :meth:`SGP.before_step`), so the base optimizer's own state
(momentum, Adam's moments) and its weight decay act on x. While every w is 1 (SGP on a regular graph) this is the
same as stepping z; under OSGP (the weights settle below 1: one message is always in flight) and on irregular
graphs, stepping z would move x by w gamma d instead.

Uniform weights: a rank keeps 1/(d+1) of (x, w) and sends 1/(d+1) to each of its d out-peers (d = 1 on the
directed exponential graph: keep 1/2, send 1/2). One message is the flat vector [x, w]: |theta| + 1 values.
Sums over ranks of x and of w are preserved, so the average is never lost.

OSGP sends without blocking and mixes each message one step late (staleness 1): at step k a rank adds what its
in-peers sent at step k-1, while the message of step k travels during step k+1's forward and backward passes.

At the inner step that ends an outer iteration no round is made: the exact average of the de-biased z that follows
would overwrite it (OSGP's last messages are taken in first). The numerator, messages and receive buffers are
allocated once and reused; z is written into the model's flat parameters in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..comm import Communicator
from ..comm.base import Completed
from ..flat import FlatParameters
from ..graphs import GRAPHS, DirectedExponential, GossipGraph
from ..registry import ConfigError
from .base import ALGORITHMS, Algorithm, AlgorithmConfig


@dataclass
class SGPConfig(AlgorithmConfig):
    graph: str  # a registered gossip graph (slowmo.graphs), over the nodes

    def check(self) -> None:
        if self.graph not in GRAPHS:
            raise ConfigError(f"algorithm.graph={self.graph!r} is not one of {', '.join(GRAPHS.names())}")


@ALGORITHMS.register("sgp", SGPConfig, label="SGP")
class SGP(Algorithm):
    """Push-sum gossip with one blocking round per inner step.

    Args:
        comm: the world communicator.
        graph: the gossip topology over the ranks (over the nodes with ``procs_per_node`` > 1);
            default :class:`~slowmo.graphs.DirectedExponential`.
        procs_per_node: ranks per node (see :class:`~slowmo.algorithms.base.Algorithm`).
    """

    def __init__(self, comm: Communicator, graph: GossipGraph | None = None, procs_per_node: int = 1) -> None:
        super().__init__(comm, procs_per_node)
        n = self.cross.world_size
        if n < 2:
            raise ValueError(
                f"{type(self).__name__} gossips between {'nodes' if procs_per_node > 1 else 'ranks'} "
                f"and needs at least 2, got {n}; use LocalSGD or AllReduce on a single "
                f"{'node' if procs_per_node > 1 else 'rank'}"
            )
        self.graph = graph if graph is not None else DirectedExponential(n)
        if self.graph.world_size != n:
            raise ValueError(
                f"the gossip graph has {self.graph.world_size} ranks but gossip runs over {n}; "
                f"build it with world_size={n}"
            )
        self.weight: torch.Tensor = torch.ones(1)

    @classmethod
    def from_config(cls, comm: Communicator, cfg: SGPConfig) -> SGP:
        if comm.world_size % cfg.procs_per_node:
            raise ConfigError(
                f"world size {comm.world_size} is not divisible by algorithm.procs_per_node={cfg.procs_per_node}"
            )
        nodes = comm.world_size // cfg.procs_per_node
        return cls(comm, GRAPHS[cfg.graph].build(nodes) if nodes > 1 else None, cfg.procs_per_node)

    def bind(self, flat: FlatParameters, buffers: list[torch.Tensor]) -> None:
        super().bind(flat, buffers)
        like = flat.data
        self.weight = torch.ones(1, dtype=like.dtype, device=like.device)
        self._numerator = like.new_empty(flat.numel + 1)  # [x, w]
        self._inboxes: list[list[torch.Tensor]] = [[], []]  # receive buffers, reused (two sets: OSGP's rounds overlap)

    # ----------------------------------------------------------------------------------- push-sum pieces
    def _fill(self, share: float, debiased: bool = False) -> torch.Tensor:
        """[x, w] times ``share``, in the numerator buffer (|theta| + 1 values); the model holds x (between the base
        step and the round), or z (``debiased``: x = z w)."""
        numerator = self._numerator
        if debiased:
            torch.mul(self.flat.values, self.weight, out=numerator[:-1]).mul_(share)
        else:
            torch.mul(self.flat.values, share, out=numerator[:-1])
        torch.mul(self.weight, share, out=numerator[-1:])
        return numerator

    def _post(self, message: torch.Tensor, step: int) -> tuple[list, list]:
        """Send ``message`` to this step's out-peers and post receives from its in-peers (sorted by rank)."""
        rank = self.cross.rank
        sends = [self.cross.isend(message, dst) for dst in self.graph.out_peers(rank, step)]
        inbox = self._inboxes[step % 2]
        sources = self.graph.in_peers(rank, step)
        inbox.extend(torch.empty_like(message) for _ in range(len(sources) - len(inbox)))
        recvs = [(buf, self.cross.irecv(buf, src)) for buf, src in zip(inbox, sources, strict=False)]
        return sends, recvs

    def _set_model(self, numerator: torch.Tensor) -> None:
        """w = the last value; z = x / w into the model."""
        self.weight.copy_(numerator[-1:])
        torch.div(numerator[:-1], self.weight, out=self.flat.values)

    @staticmethod
    def _absorb(numerator: torch.Tensor, sends: list, recvs: list) -> None:
        for buf, work in recvs:
            work.wait()
            numerator.add_(buf)
        for work in sends:
            work.wait()

    # ----------------------------------------------------------------------------------- one inner step
    def before_step(self, step: int) -> None:
        """x = z w into the model: the base optimizer steps the numerator."""
        super().before_step(step)
        self.flat.values.mul_(self.weight)

    def after_step(self, step: int, outer: bool) -> None:
        if outer:  # the exact average that follows would overwrite this round: it is not sent
            self.flat.values.div_(self.weight)
            return
        numerator = self._fill(self.graph.keep_weight(self.cross.rank, step))
        sends, recvs = self._post(numerator, step)
        for work in sends:  # the kept share is the message itself: it must not change before the sends end
            work.wait()
        self._absorb(numerator, [], recvs)
        self._set_model(numerator)

    def reset_weights(self) -> None:
        self.weight.fill_(1.0)

    def state_dict(self) -> dict[str, Any]:
        return {"weight": self.weight.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.weight.copy_(state["weight"])


@ALGORITHMS.register("osgp", SGPConfig, label="OSGP")
class OSGP(SGP):
    """Overlapped SGP: non-blocking sends, each message mixed one step late (bounded staleness 1).

    At inner step k: x = z w; keep 1/(d+1) of [x, w]; start sending 1/(d+1) to the out-peers of step k and
    receiving from the in-peers of step k; then wait for the messages of step k-1 (already on their way during
    this step's computation) and add them; z = x / w. Before an exact average (and in :meth:`state_dict`) the
    last messages are waited for, so no mass is lost and nothing is left in flight in a checkpoint.
    """

    def __init__(self, comm: Communicator, graph: GossipGraph | None = None, procs_per_node: int = 1) -> None:
        super().__init__(comm, graph, procs_per_node)
        self._in_flight: tuple[torch.Tensor | None, list, list] | None = None

    def bind(self, flat: FlatParameters, buffers: list[torch.Tensor]) -> None:
        super().bind(flat, buffers)
        self._messages = [torch.empty_like(self._numerator) for _ in range(2)]  # sent while the next step computes

    def after_step(self, step: int, outer: bool) -> None:
        if outer:  # the exact average that follows overwrites this round; flush() takes in the last messages
            self.flat.values.div_(self.weight)
            return
        numerator = self._fill(self.graph.keep_weight(self.cross.rank, step))
        message = self._messages[step % 2].copy_(numerator)  # sent while `numerator` takes in last step's messages
        sends, recvs = self._post(message, step)
        if self._in_flight is not None:
            _, old_sends, old_recvs = self._in_flight
            self._absorb(numerator, old_sends, old_recvs)
        self._set_model(numerator)
        self._in_flight = (message, sends, recvs)

    def flush(self) -> None:
        if self._in_flight is not None:
            _, sends, recvs = self._in_flight
            numerator = self._fill(1.0, debiased=True)
            self._absorb(numerator, sends, recvs)
            self._set_model(numerator)
            self._in_flight = None

    def state_dict(self) -> dict[str, Any]:
        received = []
        if self._in_flight is not None:
            message, sends, recvs = self._in_flight
            for work in sends:
                work.wait()
            for buf, work in recvs:
                work.wait()
                received.append(buf.clone())
            self._in_flight = (message, [], [(buf, Completed()) for buf in received])
        return {"weight": self.weight.clone(), "in_flight": received}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        received = [
            buf.to(dtype=self.weight.dtype, device=self.weight.device).clone() for buf in state.get("in_flight", [])
        ]
        self._in_flight = (None, [], [(buf, Completed()) for buf in received]) if received else None
