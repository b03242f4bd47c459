"""An in-process cluster: N ranks as threads of this process, running the very same algorithm code.

Determinism. Only one rank runs at a time: a rank holds the cluster's run lock while it computes and gives it
up only while it waits for a peer, so ranks never compete for the CPU. Reductions add the ranks'
contributions in rank order, whatever order the ranks arrive in, so results do not depend on thread
scheduling. Each rank also has its own torch random streams, CPU and (once CUDA is in use) every GPU's, saved and
restored whenever it gives up the run lock, so dropout behaves as in separate processes.

No sockets: messages are tensors handed over in memory. Bytes are counted as a real network would carry
them (see :mod:`slowmo.comm.base`). With a :class:`~slowmo.comm.clock.Clock`, every operation that is counted also
takes the time the clock's link model gives it, and each inner step its compute time (:meth:`Simulated.computed`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from .base import CommError, Communicator, Completed, Work
from .clock import Clock
from .launch import threads_per_rank


class _Cluster:
    """The state shared by the ranks of one simulated world."""

    def __init__(self, world_size: int, timeout: float, clock: Clock | None = None) -> None:
        self.world_size = world_size
        self.timeout = timeout
        self.clock = clock
        self.cond = threading.Condition(threading.Lock())  # its lock is the run lock
        self.slots: dict[tuple, dict] = {}
        self.mailboxes: dict[tuple, deque] = {}
        self.groups: dict[tuple[int, ...], int] = {}
        self.failure: str | None = None

    def fail(self, rank: int, error: BaseException) -> None:
        if self.failure is None:
            self.failure = f"rank {rank} failed: {type(error).__name__}: {error}"
        self.cond.notify_all()


class Simulated(Communicator):
    """One rank of an in-process simulated cluster; made by :func:`slowmo.comm.spawn` (``backend="simulated"``)."""

    def __init__(
        self, cluster: _Cluster, ranks: tuple[int, ...], global_rank: int, label: str = "", counter=None
    ) -> None:
        super().__init__(ranks.index(global_rank), len(ranks), label, counter)
        self._cluster = cluster
        self._ranks = ranks
        self._global_rank = global_rank
        self._group_id = cluster.groups.setdefault(ranks, len(cluster.groups))
        self._seq = 0

    # ----------------------------------------------------------------------------------- waiting
    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        """Give up the run lock until ``ready()``; fail fast on a peer's failure or after the timeout."""
        cluster = self._cluster
        if ready():
            return
        rng = _rng_states()
        ok = cluster.cond.wait_for(lambda: ready() or cluster.failure is not None, timeout=cluster.timeout)
        _set_rng_states(rng)
        if ready():  # completed before (or while) a peer failed: this rank goes on, as with a real backend
            return
        if cluster.failure is not None:
            raise CommError(f"rank {self._global_rank}: {what} aborted because {cluster.failure}")
        if not ok:
            raise CommError(
                f"rank {self._global_rank}: {what} timed out after {cluster.timeout:g}s; a peer is stuck or "
                "the ranks called different operations (raise the timeout if a step is legitimately slower)"
            )

    # ----------------------------------------------------------------------------------- collectives
    def _collective(
        self, kind: str, contribution: Any, combine: Callable[[list], Any], nbytes: int = 0, wait: bool = True
    ) -> tuple[Any, Work]:
        """The combined contributions, and the operation's completion on the clock (``wait``: this rank waits for it
        now, as a blocking operation does; else the returned Work waits for it)."""
        key = (self._group_id, self._seq)
        self._seq += 1
        slot = self._cluster.slots.setdefault(
            key, {"kind": kind, "parts": [None] * self.world_size, "result": None, "taken": 0, "arrivals": {}}
        )
        clock = self._cluster.clock if self._bytes.counting else None
        if clock is not None:
            slot["arrivals"][self.rank] = clock.now[self._global_rank]
        if slot["kind"] != kind:
            raise CommError(
                f"rank {self._global_rank}: called {kind} while a peer called {slot['kind']} "
                f"(collective #{key[1]}); every rank must issue the same collectives in the same order"
            )
        slot["parts"][self.rank] = contribution
        if all(p is not None for p in slot["parts"]):
            slot["result"] = combine(slot["parts"])
            slot["parts"] = None
            if slot["arrivals"]:  # the last arrival (or the group's previous collective), plus the transfer
                last = max(slot["arrivals"].values())
                slot["done"] = self._cluster.clock.complete(kind, nbytes, self._ranks, last)
            self._cluster.cond.notify_all()
        else:
            self._wait(lambda: slot["result"] is not None, f"{kind} #{key[1]}")
        result = slot["result"]
        slot["taken"] += 1
        if slot["taken"] == self.world_size:
            del self._cluster.slots[key]
        if clock is None:
            return result, Completed()
        done = _Done(clock, self._global_rank, slot["done"])
        if wait:
            done.wait()
        return result, done

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        self._all_reduce_async(tensor).wait()

    def _all_reduce_async(self, tensor: torch.Tensor) -> Work:
        total, done = self._collective("all_reduce", tensor, _sum_in_rank_order, _nbytes(tensor), wait=False)
        tensor.copy_(total)
        return done

    def _reduce_scatter(self, output: torch.Tensor, input: torch.Tensor) -> None:
        total, _ = self._collective("reduce_scatter", input, _sum_in_rank_order, _nbytes(input))
        output.copy_(total.view(self.world_size, -1)[self.rank])

    def _all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        output.copy_(self._collective("all_gather", input, torch.cat, _nbytes(output))[0])

    def _all_to_all(self, output: torch.Tensor, input: torch.Tensor) -> None:
        self._all_to_all_async(output, input).wait()

    def _all_to_all_async(self, output: torch.Tensor, input: torch.Tensor) -> Work:
        parts, done = self._collective(
            "all_to_all", input, lambda parts: [part.clone() for part in parts], _nbytes(input), wait=False
        )
        output.copy_(torch.cat([part.view(self.world_size, -1)[self.rank] for part in parts]))
        return done

    def _broadcast(self, tensor: torch.Tensor, src: int) -> None:
        tensor.copy_(self._collective("broadcast", tensor, lambda parts: parts[src].clone(), _nbytes(tensor))[0])

    def _barrier(self) -> None:
        self._collective("barrier", True, lambda parts: True)

    # ----------------------------------------------------------------------------------- the clock
    def computed(self) -> None:
        """An inner step's computation is done: this rank's time advances by its compute time."""
        if self._cluster.clock is not None:
            self._cluster.clock.compute(self._global_rank)

    def time(self) -> float | None:
        """This rank's time on the clock, seconds (None: no clock)."""
        return self._cluster.clock.now[self._global_rank] if self._cluster.clock is not None else None

    def state_dict(self) -> dict[str, Any]:
        """This rank's time and steps on the clock (a resumed run goes on from them)."""
        clock, rank = self._cluster.clock, self._global_rank
        if clock is None:
            return {}
        return {"clock": {"now": clock.now[rank], "steps": clock.steps[rank], "sending": clock.sending[rank]}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        clock, saved, rank = self._cluster.clock, state.get("clock"), self._global_rank
        if clock is not None and saved is not None:
            clock.now[rank], clock.steps[rank], clock.sending[rank] = saved["now"], saved["steps"], saved["sending"]

    # ----------------------------------------------------------------------------------- point to point
    def _mailbox(self, src: int, dst: int) -> deque:
        return self._cluster.mailboxes.setdefault((self._group_id, src, dst), deque())

    def _isend(self, tensor: torch.Tensor, dst: int) -> Work:
        """(On the clock the message leaves now and arrives a latency and its bytes over the link later; the sender
        does not wait.)"""
        clock, arrival = self._cluster.clock if self._bytes.counting else None, None
        if clock is not None:
            arrival = clock.arrival(self._global_rank, self._ranks[dst], _nbytes(tensor))
        self._mailbox(self.rank, dst).append((tensor.detach().clone(), arrival))
        self._cluster.cond.notify_all()
        return Completed()

    def _irecv(self, tensor: torch.Tensor, src: int) -> Work:
        return _Receive(self, tensor, src)

    # ----------------------------------------------------------------------------------- groups
    def _new_group(self, partition: list[list[int]], label: str) -> Communicator:
        mine = next(group for group in partition if self.rank in group)
        ranks = tuple(self._ranks[r] for r in mine)
        return Simulated(self._cluster, ranks, self._global_rank, self.label + label, self._bytes)


class _Receive:
    """A posted receive: ``wait()`` takes the oldest message from ``src`` (messages stay in order per pair)."""

    def __init__(self, comm: Simulated, tensor: torch.Tensor, src: int) -> None:
        self._comm, self._tensor, self._src = comm, tensor, src
        self._done = False

    def wait(self) -> None:
        if self._done:
            return
        comm = self._comm
        box = comm._mailbox(self._src, comm.rank)
        comm._wait(lambda: len(box) > 0, f"recv from rank {comm._ranks[self._src]}")
        message, arrival = box.popleft()
        self._tensor.copy_(message)
        if arrival is not None:
            _Done(comm._cluster.clock, comm._global_rank, arrival).wait()
        self._done = True


class _Done:
    """An operation's completion on the clock: ``wait()`` moves the rank's time to it, if that is later."""

    def __init__(self, clock: Clock, rank: int, at: float) -> None:
        self.clock, self.rank, self.at = clock, rank, at

    def wait(self) -> None:
        self.clock.now[self.rank] = max(self.clock.now[self.rank], self.at)


def _rng_states() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """This thread's view of the global random streams: the CPU's and, once CUDA is initialised, every GPU's."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def _set_rng_states(states: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _sum_in_rank_order(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0].clone()
    for part in parts[1:]:
        total.add_(part)
    return total


def run_simulated(fn: Callable, world_size: int, args: tuple, timeout: float, clock: Clock | None = None) -> list:
    """Run ``fn(comm, *args)`` on ``world_size`` simulated ranks (threads); return the results in rank order. Each rank
    computes with the CPU threads a gloo rank of the same world would get (:func:`~slowmo.comm.launch.threads_per_rank`:
    ``OMP_NUM_THREADS``, or the cores shared among the ranks), so that a run gives the same numbers, bit for bit, on
    both backends (torch's reductions over more threads add in another order). ``clock``: the ranks' virtual time."""
    cluster = _Cluster(world_size, timeout, clock)
    world = tuple(range(world_size))
    results: list = [None] * world_size
    errors: list[BaseException | None] = [None] * world_size
    start_rng = _rng_states()

    threads_each = threads_per_rank(local_world_size=world_size)

    def body(rank: int) -> None:
        torch.set_num_threads(threads_each)  # (this thread's own setting, not the caller's)
        with cluster.cond:
            _set_rng_states(start_rng)
            try:
                results[rank] = fn(Simulated(cluster, world, rank), *args)
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread below
                errors[rank] = error
                cluster.fail(rank, error)

    threads = [threading.Thread(target=body, args=(r,), name=f"slowmo-rank{r}", daemon=True) for r in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    _set_rng_states(start_rng)
    first = next((e for e in errors if e is not None and not isinstance(e, CommError)), None)
    first = first or next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return results
