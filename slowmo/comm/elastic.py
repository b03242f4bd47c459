"""``dist=torchft``: replicas that leave and join a running job, on torchft (``pip install -e '.[elastic]'``).

Each replica group (one process in phase 1) has a torchft ``Manager``: a quorum per outer iteration from a lighthouse,
a process group reconfigured to the quorum's members, a commit vote, and healing of a joining replica from a live peer
(its state served over HTTP by torchft's checkpoint transport). :class:`Elastic` is the :class:`Communicator` the
algorithm and SlowMo talk to; its ``rank`` and ``world_size`` are this replica's place in the current quorum, so the
mean of an outer step is over the m_t replicas of round t, and its bytes follow the formulas with n = m_t.

A round, for replica i (:mod:`slowmo.train.loop` drives it):

1. :meth:`join` at the start: the first quorum; a replica behind the others (new, or restarted after a kill) receives
   the state of a live peer here, before its first inner step.
2. tau inner steps; then SlowMo's outer step: the all-reduce of the models (through ``Manager.allreduce``, which turns
   a peer's failure into a recorded error rather than a hang), then :meth:`commit`, the vote. When the vote fails
   SlowMo discards the round (x^i back to x_{t,0}; u and the base optimizer's state untouched).
3. :meth:`next_round` right after the vote: the next quorum, so that a replica waiting to join enters round t+1 at its
   first inner step, healed to x_{t+1,0} (torchft's own DiLoCo takes the quorum at the end of a round instead, so a
   joiner's first local steps are not counted, or are counted twice).
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from ..registry import setting
from .base import CommError, Communicator, Single, Work, ring_all_reduce_bytes

BACKEND = "torchft"
LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"  # torchft's own name for the lighthouse's address
REPLICA_ENV = "REPLICA_GROUP_ID"  # this replica group's id on a cluster (e.g. a SLURM array task id)


@dataclass
class ElasticSettings:
    """The keys of ``configs/dist/torchft.yaml`` beyond every backend's (``dist.<key>``; defaults in the YAML)."""

    lighthouse: str | None = setting(run_control=True, default=None)  # null: $TORCHFT_LIGHTHOUSE, or a local one
    replica_id: int | None = setting(run_control=True, minimum=0, default=None)  # null: $REPLICA_GROUP_ID, or all
    min_replicas: int = setting(minimum=1, default=1)  # a round commits only with at least this many replicas
    quorum_timeout_s: float = setting(run_control=True, minimum=0.001, default=60.0)
    join_timeout_s: float = setting(run_control=True, minimum=0.0, default=1.0)
    heartbeat_timeout_s: float = setting(run_control=True, minimum=0.001, default=2.0)  # then a silent replica is out
    max_restarts: int = setting(run_control=True, minimum=0, default=3)  # per replica, by the local launcher


def available() -> str | None:
    """None when torchft imports here; else why not, in one line."""
    os.environ.setdefault("RUST_LOG", "warn")  # (read once, as torchft loads): its Rust side logs every quorum at info
    try:
        import torchft  # noqa: F401
    except ImportError as error:
        return f"dist=torchft needs the torchft package ({error}); install it with pip install -e '.[elastic]'"
    return None


def start_lighthouse(min_replicas: int, join_timeout_s: float, heartbeat_timeout_s: float) -> Any:
    """A lighthouse on a free port of this host (``.address()``, ``.shutdown()``). It waits for every replica that
    still heartbeats (each sends one every 0.1 s) before it forms a quorum, up to ``join_timeout_s`` for those that have
    not asked yet: a killed replica holds the next quorum back for ``heartbeat_timeout_s``."""
    from torchft._torchft import LighthouseServer

    return LighthouseServer(
        bind="[::]:0",
        min_replicas=min_replicas,
        join_timeout_ms=int(join_timeout_s * 1000),
        quorum_tick_ms=20,
        heartbeat_timeout_ms=int(heartbeat_timeout_s * 1000),
    )


class Elastic(Communicator):
    """Replica ``replica_id`` of ``replicas`` in a torchft job; collectives run over the current quorum.

    Args:
        replica_id: this replica's id, 0..replicas-1 (its data shard and random stream).
        replicas: the replicas the job was started with (the data is cut into that many shards).
        lighthouse: the lighthouse's address.
        min_replicas, quorum_timeout_s: a round needs ``min_replicas``; waiting longer than ``quorum_timeout_s`` for
            them raises :class:`~slowmo.comm.CommError`.
        timeout_s: every other wait (collectives, the vote, a heal's transfer).
    """

    elastic = True

    def __init__(
        self,
        replica_id: int,
        replicas: int,
        lighthouse: str,
        min_replicas: int = 1,
        quorum_timeout_s: float = 60.0,
        timeout_s: float = 60.0,
    ) -> None:
        super().__init__(0, 1)
        logging.getLogger("torchft").setLevel(logging.CRITICAL)  # its failures come back here, told in one line
        from torch.distributed import TCPStore
        from torchft.manager import Manager
        from torchft.process_group import ProcessGroupGloo

        self.replica_id, self.replicas = replica_id, replicas
        self.min_replicas, self.quorum_timeout_s = min_replicas, quorum_timeout_s
        self._store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # this replica group's own
        timeout = timedelta(seconds=timeout_s)
        self._pg = ProcessGroupGloo(timeout=timeout)
        self.manager = Manager(
            pg=self._pg,
            load_state_dict=None,
            state_dict=None,
            min_replica_size=min_replicas,
            use_async_quorum=False,  # the quorum (and a heal) completes before the round's first inner step
            timeout=timeout,
            quorum_timeout=timedelta(seconds=quorum_timeout_s),
            rank=0,
            world_size=1,
            store_addr="127.0.0.1",
            store_port=self._store.port,
            lighthouse_addr=lighthouse,
            replica_id=f"replica_{replica_id}",
            hostname=socket.gethostname(),
            init_sync=False,  # every replica builds x_{0,0} from the run's seed
        )
        self.rounds: list[dict[str, Any]] = []  # this process's votes: the participants and whether they committed
        self.round = 0  # outer iterations this replica's state has been through (votes, passed or failed)
        self.heals = 0
        self.membership_s = 0.0  # time in the votes and the quorums (the cost of elasticity, waits for peers included)
        self._voted = False

    @property
    def seat(self) -> tuple[int, int]:
        return self.replica_id, self.replicas

    def local(self) -> Communicator:
        return Single()  # the training loop's own agreements stay inside the replica

    # ----------------------------------------------------------------------------------- membership
    def join(self, state: Callable[[], dict[str, Any]], load: Callable[[dict[str, Any]], None]) -> None:
        """Serve ``state()`` to replicas that heal from this one, heal through ``load`` when this one is behind, and
        take the first quorum."""

        def heal(received: dict[str, Any]) -> None:
            load(received)
            self.heals += 1

        self.manager.register_state_dict_fn("slowmo", heal, lambda: copy.deepcopy(state()))  # a snapshot: the
        # transport serves it while this replica trains on
        self._quorum()

    def commit(self) -> bool:
        """The vote on the outer step just averaged: True on every replica of the quorum, or False on all of them
        (a peer failed during the round, or fewer than ``min_replicas`` took part)."""
        start = time.perf_counter()
        seen = torch.zeros(self.replicas)
        seen[self.replica_id] = 1.0
        with self.control():
            self.all_reduce(seen)
        error = self.manager.errored()
        ok = bool(self.manager.should_commit())
        self.round += 1
        self.membership_s += time.perf_counter() - start
        participants = [i for i, flag in enumerate(seen.tolist()) if flag > 0.5]  # (on a failed round: as far as known)
        self.rounds.append({"participants": participants, "committed": ok, "time": time.time()})
        if not ok:
            self._pg.abort()  # now, not at the next quorum: a peer still waiting on this replica fails at once
            why = str(error.original_exception).splitlines()[0][:160] if error else "fewer than min_replicas voted"
            print(f"replica {self.replica_id}: outer step {len(self.rounds)} discarded ({why})", file=sys.stderr)
        self._voted = True
        return ok

    def next_round(self, last: bool = False) -> dict[str, Any] | None:
        """After a vote: the quorum of the next round (a late replica joins, healed, here), none after the ``last``
        step. Returns the vote's round."""
        if not self._voted:
            return None
        self._voted = False
        if not last:
            start = time.perf_counter()
            self._quorum()
            self.membership_s += time.perf_counter() - start
        return self.rounds[-1]

    def _quorum(self) -> None:
        # torchft heals a replica whose step is below the quorum's highest: the step is our round, so that a replica
        # behind in inner steps (restarted from an older checkpoint of its own) takes a live peer's state
        self.manager.load_state_dict({"step": self.round, "batches_committed": self.manager.batches_committed()})
        try:
            self.manager.start_quorum()
        except TimeoutError:
            raise CommError(
                f"replica {self.replica_id}: fewer than dist.min_replicas={self.min_replicas} replicas for "
                f"dist.quorum_timeout_s={self.quorum_timeout_s:g} s; start more replicas or lower dist.min_replicas"
            ) from None
        if self.manager.errored():
            raise CommError(
                f"replica {self.replica_id}: the quorum failed: {self.manager.errored().original_exception}"
            )
        self.rank = self.manager.participating_rank() or 0
        self.world_size = self.manager.num_participants()

    def report(self) -> dict[str, Any]:
        """What summary.json says of this replica's membership."""
        return {
            "participants": [r["participants"] for r in self.rounds],
            "failed_commits": sum(not r["committed"] for r in self.rounds),
            "heals": self.heals,
            "membership_s": self.membership_s,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round}  # who is behind is decided by it

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round = int(state.get("round", 0))

    def close(self) -> None:
        self.manager.shutdown(wait=False)

    # ----------------------------------------------------------------------------------- primitives
    def _all_reduce(self, tensor: torch.Tensor) -> None:
        """A sum over the quorum through the manager: a failed peer becomes the manager's recorded error (the vote then
        fails), not an exception here; the tensor is then garbage, which the discarded round never uses."""
        from torch.distributed import ReduceOp

        self.manager.allreduce(tensor, reduce_op=ReduceOp.SUM).wait()

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """As a sum of ``src``'s tensor and zeros (torchft's manager has no broadcast), and counted as that
        all-reduce."""
        self._count("broadcast", ring_all_reduce_bytes(tensor.numel() * tensor.element_size(), self.world_size))
        if self.world_size > 1:
            if self.rank != src:
                tensor.zero_()
            self._all_reduce(tensor)
        return tensor

    def _barrier(self) -> None:
        self._all_reduce(torch.zeros(1))

    def _unsupported(self, *args: Any) -> Any:
        raise CommError("dist=torchft averages whole models only (phase 1); this operation is refused at start")

    _reduce_scatter = _all_gather = _all_to_all = _broadcast = _unsupported  # type: ignore[assignment]

    def _isend(self, tensor: torch.Tensor, dst: int) -> Work:
        return self._unsupported()

    _irecv = _isend  # type: ignore[assignment]

    def _new_group(self, partition: list[list[int]], label: str) -> Communicator:
        return self._unsupported()


def replica_from_env(replica_id: int | None, lighthouse: str | None) -> tuple[int | None, str | None]:
    """``dist.replica_id`` and ``dist.lighthouse``, else the environment's (on a cluster, one job per replica)."""
    if replica_id is None and os.environ.get(REPLICA_ENV, "").isdigit():
        replica_id = int(os.environ[REPLICA_ENV])
    return replica_id, lighthouse or os.environ.get(LIGHTHOUSE_ENV)
