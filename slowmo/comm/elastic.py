"""``dist=torchft``: replicas that leave and join a running job, on torchft (``pip install -e '.[elastic]'``).

Each replica group (one process in phase 1) has a torchft ``Manager``: a quorum per outer iteration from a lighthouse,
a process group reconfigured to the quorum's members, a commit vote, and healing of a joining replica from a live peer.
:class:`Elastic` is the :class:`Communicator` the algorithm and SlowMo talk to; its ``rank`` and ``world_size`` are this
replica's place in the current quorum, so the mean of an outer step is over the m_t replicas of round t, and its bytes
follow the formulas with n = m_t.

What listens, and where: every listener a replica starts or asks torchft for (its store, its manager's server, its
gloo process group) is bound to one address, ``host``: the loopback address for a local run, this node's address on
its route to the lighthouse on a cluster (:func:`address_towards`), never every interface. A heal goes over the
replicas' own process group (:class:`_HealOverProcessGroup`), not through torchft's HTTP checkpoint server (which
listens on every interface, serves the state to whoever asks, and unpickles what it fetches with
``weights_only=False``); the healing replica reads the state with ``torch.load(weights_only=True)``.

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

import concurrent.futures
import contextlib
import copy
import io
import logging
import os
import pickle
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from ..registry import setting
from .base import CommError, Communicator, Single, Work, ring_all_reduce_bytes

BACKEND = "torchft"
LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"  # torchft's own name for the lighthouse's address
REPLICA_ENV = "REPLICA_GROUP_ID"  # this replica group's id on a cluster (e.g. a SLURM array task id)
LOOPBACK = "127.0.0.1"  # where a local run listens
_POLL_S = 0.05  # how often a quorum wait looks at the stop event


class QuorumTimeout(CommError):
    """Fewer than ``dist.min_replicas`` replicas came within ``dist.quorum_timeout_s``: the run's verdict, not a failure
    of this replica (the local launcher does not restart it)."""


class _Stopped(Exception):
    """A stop signal came while this replica waited for a quorum."""


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


def start_lighthouse(
    min_replicas: int, join_timeout_s: float, heartbeat_timeout_s: float, host: str = LOOPBACK
) -> tuple[Any, str]:
    """A lighthouse on a free port of ``host`` (``.shutdown()``) and its address. It waits for every replica that still
    heartbeats (each sends one every 0.1 s) before it forms a quorum, up to ``join_timeout_s`` for those that have not
    asked yet: a killed replica holds the next quorum back for ``heartbeat_timeout_s``. Its dashboard (the address in
    a browser) can kill a replica: whoever reaches ``host`` can."""
    from torchft._torchft import LighthouseServer

    server = LighthouseServer(
        bind=f"{_bracketed(host)}:0",
        min_replicas=min_replicas,
        join_timeout_ms=int(join_timeout_s * 1000),
        quorum_tick_ms=20,
        heartbeat_timeout_ms=int(heartbeat_timeout_s * 1000),
    )
    port = server.address().rsplit(":", 1)[1]  # (its address names this machine's hostname, whatever it binds)
    return server, f"http://{_bracketed(host)}:{port}"


def address_towards(lighthouse: str) -> str:
    """This node's address on its route to the lighthouse: the network the replicas reach each other through (a
    cluster's), and the only one a cluster replica listens on. No packet is sent."""
    parts = urllib.parse.urlsplit(lighthouse if "://" in lighthouse else f"http://{lighthouse}")
    try:
        family, _, _, _, address = socket.getaddrinfo(parts.hostname, parts.port or 80, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
            return probe.getsockname()[0]
    except (OSError, ValueError) as error:
        raise CommError(
            f"cannot find a route to the lighthouse {lighthouse} ({error}); check dist.lighthouse"
        ) from None


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class Elastic(Communicator):
    """Replica ``replica_id`` of ``replicas`` in a torchft job; collectives run over the current quorum.

    Args:
        replica_id: this replica's id, 0..replicas-1 (its data shard and random stream).
        replicas: the replicas the job was started with (the data is cut into that many shards).
        lighthouse: the lighthouse's address.
        min_replicas, quorum_timeout_s: a round needs ``min_replicas``; waiting longer than ``quorum_timeout_s`` for
            them raises :class:`QuorumTimeout`.
        timeout_s: every other wait (collectives, the vote, a heal's transfer).
        host: the address every listener of this replica binds to (:data:`LOOPBACK` for a local run).
        stop: set by a stop signal (:data:`slowmo.train.preemption.STOP`): a quorum wait then ends at once, and the
            replica goes on without its peers (a group of one, every vote failed) to the training loop's next signal
            check, where it writes its checkpoint and stops.
    """

    elastic = True
    agrees_between_rounds = False

    def __init__(
        self,
        replica_id: int,
        replicas: int,
        lighthouse: str,
        min_replicas: int = 1,
        quorum_timeout_s: float = 60.0,
        timeout_s: float = 60.0,
        host: str = LOOPBACK,
        stop: threading.Event | None = None,
    ) -> None:
        super().__init__(0, 1)
        for name in ("torchft", "torchft_quorums", "torchft_commits", "torchft_errors"):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # its failures come back here, told in one line
        from torch.distributed import TCPStore
        from torchft.manager import Manager

        self.replica_id, self.replicas = replica_id, replicas
        self.min_replicas, self.quorum_timeout_s = min_replicas, quorum_timeout_s
        listener = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        port = listener.getsockname()[1]
        self._store = TCPStore(host, port, is_master=True, wait_for_workers=False, master_listen_fd=listener.detach())
        timeout = timedelta(seconds=timeout_s)
        self._pg = _process_group(host, timeout)
        with _manager_server_bound_to(host):
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
                store_addr=host,
                store_port=port,
                lighthouse_addr=lighthouse,
                replica_id=f"replica_{replica_id}",
                hostname=_bracketed(host),
                checkpoint_transport=_HealOverProcessGroup(self._pg),
                init_sync=False,  # every replica builds x_{0,0} from the run's seed
            )
        self._stop = stop if stop is not None else threading.Event()
        self.manager._executor.shutdown(wait=False)  # (it has started no thread yet)
        self.manager._executor = _QuorumThreads(self._stop)
        self.rounds: list[dict[str, Any]] = []  # this process's votes: the participants and whether they committed
        self.round = 0  # outer iterations this replica's state has been through (votes, passed or failed)
        self.heals = 0
        self.membership_s = 0.0  # time in the votes and the quorums (the cost of elasticity, waits for peers included)
        self._voted = False
        self._log: Callable[[dict[str, Any]], None] = lambda vote: None  # the loop's record of each vote
        self.timed_out = False  # fewer than min_replicas came within quorum_timeout_s (the run's verdict)
        self._alone = False  # a stop signal ended a quorum wait: no peers from then on
        self._alone_lock = threading.Lock()  # a snapshot served to a healing peer is taken whole before that, or not

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

        def snapshot() -> dict[str, Any]:  # taken in torchft's quorum thread, sent while this replica trains on
            with self._alone_lock:
                if self._alone:
                    raise CommError(f"replica {self.replica_id} stopped; it serves no state")
                return copy.deepcopy(state())

        self.manager.register_state_dict_fn("slowmo", heal, snapshot)
        self._quorum()

    def commit(self) -> bool:
        """The vote on the outer step just averaged: True on every replica of the quorum, or False on all of them
        (a peer failed during the round, or fewer than ``min_replicas`` took part; always False once alone)."""
        start = time.perf_counter()
        if self._alone:
            self.round += 1
            self.rounds.append({"participants": [self.replica_id], "committed": False, "time": time.time()})
            self._voted = True
            return False
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
            why = _first_line(error.original_exception) if error else "fewer than min_replicas voted"
            print(f"replica {self.replica_id}: outer step {len(self.rounds)} discarded ({why})", file=sys.stderr)
        self._voted = True
        return ok

    def on_round(self, log: Callable[[dict[str, Any]], None]) -> None:
        self._log = log

    def next_round(self, last: bool = False) -> None:
        """After a vote: the vote logged (before a heal may move the replica's progress on), then the quorum of the
        next round (a late replica joins, healed, here), none after the ``last`` step."""
        if not self._voted:
            return
        self._voted = False
        self._log(self.rounds[-1])
        if not last:
            start = time.perf_counter()
            self._quorum()
            self.membership_s += time.perf_counter() - start

    def _quorum(self) -> None:
        if self._alone:
            return
        # torchft heals a replica whose step is below the quorum's highest: the step is our round, so that a replica
        # behind in inner steps (restarted from an older checkpoint of its own) takes a live peer's state
        self.manager.load_state_dict({"step": self.round, "batches_committed": self.manager.batches_committed()})
        try:
            self.manager.start_quorum()
        except _Stopped:
            with self._alone_lock:
                self._alone = True
            self.rank, self.world_size = 0, 1
            print(
                f"replica {self.replica_id}: a stop signal came while it waited for a quorum; it goes on alone to its "
                "next signal check, then writes its checkpoint and stops",
                file=sys.stderr,
                flush=True,
            )
            return
        except TimeoutError:
            self.timed_out = True
            raise QuorumTimeout(
                f"replica {self.replica_id}: fewer than dist.min_replicas={self.min_replicas} replicas for "
                f"dist.quorum_timeout_s={self.quorum_timeout_s:g} s; start more replicas or lower dist.min_replicas"
            ) from None
        error = self.manager.errored()
        if error:
            raise CommError(f"replica {self.replica_id}: the quorum failed: {_first_line(error.original_exception)}")
        self.rank = self.manager.participating_rank() or 0
        self.world_size = self.manager.num_participants()

    def report(self) -> dict[str, Any]:
        """What summary.json says of this replica's membership, under ``elastic``."""
        return {
            "elastic": {
                "participants": [r["participants"] for r in self.rounds],
                "failed_commits": sum(not r["committed"] for r in self.rounds),
                "heals": self.heals,
                "membership_s": self.membership_s,
            }
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


def _first_line(error: BaseException) -> str:
    """An error's first line, whole."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _process_group(host: str, timeout: timedelta) -> Any:
    """torchft's reconfigurable gloo process group, its gloo device bound to ``host`` (torch's default binds whatever
    this machine's hostname resolves to), and without torchft's call of a deprecated gloo setting (a C++ warning on
    stderr at every reconfiguration)."""
    from torch.distributed import ProcessGroup
    from torch.distributed import ProcessGroupGloo as Gloo
    from torchft.process_group import ProcessGroupGloo

    class BoundGloo(ProcessGroupGloo):
        def _create_pg(self, store: Any, rank: int, world_size: int) -> ProcessGroup:
            options = Gloo._Options()
            options._timeout = self._timeout
            options._devices = [Gloo.create_device(hostname=host)]
            pg = ProcessGroup(store, rank, world_size)
            pg._set_default_backend(ProcessGroup.BackendType.GLOO)
            backend = Gloo(store, rank, world_size, options)
            pg._register_backend(torch.device("cpu"), ProcessGroup.BackendType.GLOO, backend)
            return pg

    return BoundGloo(timeout=timeout)


@contextlib.contextmanager
def _manager_server_bound_to(host: str) -> Iterator[None]:
    """While a torchft ``Manager`` is built, its server binds ``host``, on the port it chose (torchft 0.2.0 binds
    every interface, ``[::]``, and has no setting for it)."""
    import torchft.manager

    server = torchft.manager.ManagerServer

    def bound(**kwargs: Any) -> Any:
        port = kwargs["bind"].rsplit(":", 1)[1]
        return server(**{**kwargs, "bind": f"{_bracketed(host)}:{port}"})

    torchft.manager.ManagerServer = bound
    try:
        yield
    finally:
        torchft.manager.ManagerServer = server


class _QuorumThreads:
    """What torchft's ``Manager`` asks of its executor (``submit``, ``shutdown``): each quorum in a daemon thread of its
    own, its future's ``result()`` raising :class:`_Stopped` once ``stop`` is set. A quorum given up that way leaves its
    thread blocked in torchft's request to the lighthouse until the quorum's timeout: a daemon thread does not hold
    the process's exit back that long (torchft's own executor thread would)."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        future = _StoppableFuture(self.stop)

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as error:  # noqa: BLE001 - raised again by result(), in the waiting thread
                    future.set_exception(error)

        threading.Thread(target=run, name="torchft_quorum", daemon=True).start()
        return future

    def shutdown(self, wait: bool = True) -> None:
        """Nothing to wait for (a quorum left behind ends with the process)."""


class _StoppableFuture(concurrent.futures.Future):
    """A quorum's future, which its waiter can give up on (see :class:`_QuorumThreads`)."""

    def __init__(self, stop: threading.Event) -> None:
        super().__init__()
        self.stop = stop

    def result(self, timeout: float | None = None) -> Any:
        """The quorum's outcome; :class:`_Stopped` if ``stop`` is set while it is not done."""
        while timeout is None and not self.done():
            if self.stop.is_set():
                raise _Stopped
            concurrent.futures.wait([self], timeout=_POLL_S)
        return super().result(timeout)


class _HealOverProcessGroup:
    """torchft's checkpoint transport over the replicas' own process group, which torchft has reconfigured to the
    quorum (the healing replicas included) before a heal: the state as ``torch.save`` bytes, their length and then
    them, read back with ``torch.load(weights_only=True)``. No listener of its own, and nothing unpickled but tensors
    and plain data (torchft's ``PGTransport`` sends its metadata through ``pickle``; its ``HTTPTransport``, the
    default, serves the state over HTTP on every interface and loads it with ``weights_only=False``)."""

    def __init__(self, pg: Any) -> None:
        self._pg = pg

    def metadata(self) -> str:
        return "process group"

    def disallow_checkpoint(self) -> None:
        """Nothing is served between heals."""

    def send_checkpoint(self, dst_ranks: list[int], step: int, state_dict: Any, timeout: timedelta) -> None:
        payload = encode_state({"step": step, "state": state_dict})
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        works = [self._pg.send([tensor], rank, tag) for rank in dst_ranks for tag, tensor in ((1, size), (2, payload))]
        for work in works:
            work.wait(timeout)

    def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta) -> Any:
        size = torch.zeros(1, dtype=torch.int64)
        self._pg.recv([size], src_rank, 1).wait(timeout)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        self._pg.recv([payload], src_rank, 2).wait(timeout)
        received = decode_state(payload)
        if received["step"] != step:
            raise CommError(f"a heal sent the state of round {received['step']}, this replica asked for {step}")
        return received["state"]

    def shutdown(self, wait: bool = True) -> None:
        """Nothing to stop."""


def encode_state(state: Any) -> torch.Tensor:
    """``state`` (tensors and plain data) as the bytes of ``torch.save``, in a uint8 tensor."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def decode_state(payload: torch.Tensor) -> Any:
    """What :func:`encode_state` wrote, read with ``weights_only=True``: a payload holding any other pickled object is
    refused, in one line, without being built."""
    try:
        return torch.load(io.BytesIO(payload.numpy().tobytes()), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        raise CommError(
            f"a peer's state holds a pickled {found.group(1) if found else 'object'}, not only tensors and plain data; "
            "refused"
        ) from None


def replica_from_env(replica_id: int | None, lighthouse: str | None) -> tuple[int | None, str | None]:
    """``dist.replica_id`` and ``dist.lighthouse``, else the environment's (on a cluster, one job per replica)."""
    if replica_id is None and os.environ.get(REPLICA_ENV, "").isdigit():
        replica_id = int(os.environ[REPLICA_ENV])
    return replica_id, lighthouse or os.environ.get(LIGHTHOUSE_ENV)
