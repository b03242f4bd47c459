"""An in-process cluster: N ranks as threads of this process, running the very same algorithm code.

Determinism. Only one rank runs at a time: a rank holds the cluster's run lock while it computes and gives it
up only while it waits for a peer, so ranks never compete for the CPU. Reductions add the ranks'
contributions in rank order, whatever order the ranks arrive in, so results do not depend on thread
scheduling. Each rank also has its own torch random streams, CPU and (once CUDA is in use) every GPU's, saved and
restored whenever it gives up the run lock, so dropout behaves as in separate processes.

No sockets: messages are tensors handed over in memory. Bytes are counted as a real network would carry
them (see :mod:`slowmo.comm.base`).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from .base import CommError, Communicator, Completed, Work
from .launch import threads_per_rank


class _Cluster:
    """The state shared by the ranks of one simulated world."""

    def __init__(self, world_size: int, timeout: float) -> None:
        self.world_size = world_size
        self.timeout = timeout
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
    def _collective(self, kind: str, contribution: Any, combine: Callable[[list], Any]) -> Any:
        key = (self._group_id, self._seq)
        self._seq += 1
        slot = self._cluster.slots.setdefault(
            key, {"kind": kind, "parts": [None] * self.world_size, "result": None, "taken": 0}
        )
        if slot["kind"] != kind:
            raise CommError(
                f"rank {self._global_rank}: called {kind} while a peer called {slot['kind']} "
                f"(collective #{key[1]}); every rank must issue the same collectives in the same order"
            )
        slot["parts"][self.rank] = contribution
        if all(p is not None for p in slot["parts"]):
            slot["result"] = combine(slot["parts"])
            slot["parts"] = None
            self._cluster.cond.notify_all()
        else:
            self._wait(lambda: slot["result"] is not None, f"{kind} #{key[1]}")
        result = slot["result"]
        slot["taken"] += 1
        if slot["taken"] == self.world_size:
            del self._cluster.slots[key]
        return result

    def _all_reduce(self, tensor: torch.Tensor) -> None:
        tensor.copy_(self._collective("all_reduce", tensor, _sum_in_rank_order))

    def _reduce_scatter(self, output: torch.Tensor, input: torch.Tensor) -> None:
        total = self._collective("reduce_scatter", input, _sum_in_rank_order)
        output.copy_(total.view(self.world_size, -1)[self.rank])

    def _all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        output.copy_(self._collective("all_gather", input, torch.cat))

    def _all_to_all(self, output: torch.Tensor, input: torch.Tensor) -> None:
        parts = self._collective("all_to_all", input, lambda parts: [part.clone() for part in parts])
        output.copy_(torch.cat([part.view(self.world_size, -1)[self.rank] for part in parts]))

    def _broadcast(self, tensor: torch.Tensor, src: int) -> None:
        tensor.copy_(self._collective("broadcast", tensor, lambda parts: parts[src].clone()))

    def _barrier(self) -> None:
        self._collective("barrier", True, lambda parts: True)

    # ----------------------------------------------------------------------------------- point to point
    def _mailbox(self, src: int, dst: int) -> deque:
        return self._cluster.mailboxes.setdefault((self._group_id, src, dst), deque())

    def _isend(self, tensor: torch.Tensor, dst: int) -> Work:
        self._mailbox(self.rank, dst).append(tensor.detach().clone())
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
        box = self._comm._mailbox(self._src, self._comm.rank)
        self._comm._wait(lambda: len(box) > 0, f"recv from rank {self._comm._ranks[self._src]}")
        self._tensor.copy_(box.popleft())
        self._done = True


def _rng_states() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """This thread's view of the global random streams: the CPU's and, once CUDA is initialised, every GPU's."""
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def _set_rng_states(states: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _sum_in_rank_order(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0].clone()
    for part in parts[1:]:
        total.add_(part)
    return total


def run_simulated(fn: Callable, world_size: int, args: tuple, timeout: float) -> list:
    """Run ``fn(comm, *args)`` on ``world_size`` simulated ranks (threads); return the results in rank order. Each rank
    computes with the CPU threads a gloo rank of the same world would get (:func:`~slowmo.comm.launch.threads_per_rank`:
    ``OMP_NUM_THREADS``, or the cores shared among the ranks), so that a run gives the same numbers, bit for bit, on
    both backends (torch's reductions over more threads add in another order)."""
    cluster = _Cluster(world_size, timeout)
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
