"""The communicator interface that every algorithm talks to, with the byte accounting shared by all backends.

Algorithms never import ``torch.distributed``: they call the methods below, and each backend implements the
underscore-prefixed primitives. All buffers are flat (1-D, contiguous) tensors.

Bytes are counted per rank and per operation kind, as the bytes *this rank sends* under the
bandwidth-optimal algorithm for each collective (n = group size, B = the buffer's size in bytes):

    all_reduce      2 (n-1)/n * B          (ring: reduce-scatter then all-gather)
    reduce_scatter    (n-1)/n * B_in
    all_gather        (n-1)/n * B_out
    all_to_all        (n-1)/n * B_in       (every rank keeps one of its n slices)
    broadcast       B on every rank but the last of the chain that starts at the root (n-1 sends in all)
    send / isend    B                      (point to point: exactly what goes on the wire)

Both backends count the same way, so a number measured in the simulator is the number a real run sends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, Protocol

import torch

ReduceOp = Literal["sum", "mean"]


class CommError(RuntimeError):
    """A peer did not answer in time or failed: raised on every rank that waits for it."""


class Work(Protocol):
    """Handle of a non-blocking operation."""

    def wait(self) -> None: ...


class Completed:
    """A Work that has already completed."""

    def wait(self) -> None:
        return None


def ring_all_reduce_bytes(nbytes: int, n: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``nbytes`` over ``n`` ranks: 2 (n-1)/n * nbytes."""
    return 2 * (n - 1) * nbytes // n


class Bytes(Counter):
    """Bytes sent by kind, shared by a communicator and the groups made from it, with the switches they share: whether
    operations are counted now, and under which purpose (so that :meth:`Communicator.uncounted` on the world also
    silences a sub-group's collectives run meanwhile, e.g. an evaluation's average over sharded replicas' groups)."""

    def __init__(self) -> None:
        super().__init__()
        self.counting = True
        self.purpose = ""


class Communicator(ABC):
    """One rank's view of a group of ``world_size`` ranks.

    Attributes:
        rank: this rank's index in the group, 0..world_size-1.
        world_size: number of ranks in the group.
        label: prefix of this group's operation kinds in :meth:`stats` ("" for the world group).
    """

    rank: int
    world_size: int
    overlaps: bool = False  # whether an operation started now runs while this rank computes (real backends)
    elastic: bool = False  # whether the group may change between outer steps (dist=torchft: a quorum per round)
    # whether collectives may run between outer steps (an evaluation's average of the model, the final exact average);
    # an elastic group agrees only in a round's vote, after which its replicas hold the same model
    agrees_between_rounds: bool = True

    def __init__(self, rank: int, world_size: int, label: str = "", counter: Bytes | None = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.label = label
        self._bytes: Bytes = counter if counter is not None else Bytes()

    # ----------------------------------------------------------------------------------- collectives
    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        """In place: every rank gets the sum (or mean) over ranks. Returns ``tensor``."""
        self._count("all_reduce", ring_all_reduce_bytes(_nbytes(tensor), self.world_size))
        if self.world_size > 1:
            self._all_reduce(tensor)
            if op == "mean":
                tensor.div_(self.world_size)
        return tensor

    def all_reduce_async(self, tensor: torch.Tensor) -> Work:
        """Start summing ``tensor`` over ranks in place; it holds the sum once ``wait()`` returns (and must not be
        touched before). Backends that cannot overlap (the simulator) complete it at once."""
        self._count("all_reduce", ring_all_reduce_bytes(_nbytes(tensor), self.world_size))
        if self.world_size == 1:
            return Completed()
        return self._all_reduce_async(tensor)

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
        """``output`` (length L) gets slice ``rank`` of the sum over ranks of ``input`` (length n*L); ``output`` may be
        that slice of ``input`` itself (in place)."""
        if input.numel() != output.numel() * self.world_size:
            raise ValueError(
                f"reduce_scatter: input has {input.numel()} elements, expected world_size * output = "
                f"{self.world_size} * {output.numel()}; pad the input to a multiple of world_size"
            )
        _same_dtype("reduce_scatter", output, input)
        self._count("reduce_scatter", (self.world_size - 1) * _nbytes(input) // self.world_size)
        if self.world_size > 1:
            self._reduce_scatter(output, input)
        else:
            output.copy_(input)
        return output

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
        """``output`` (length n*L) gets the concatenation in rank order of every rank's ``input`` (length L); ``input``
        may be slice ``rank`` of ``output`` itself (in place)."""
        if output.numel() != input.numel() * self.world_size:
            raise ValueError(
                f"all_gather: output has {output.numel()} elements, expected world_size * input = "
                f"{self.world_size} * {input.numel()}"
            )
        _same_dtype("all_gather", output, input)
        self._count("all_gather", (self.world_size - 1) * _nbytes(output) // self.world_size)
        if self.world_size > 1:
            self._all_gather(output, input)
        else:
            output.copy_(input)
        return output

    def all_to_all(self, output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
        """``input`` and ``output`` are n equal slices; slice j of ``input`` goes to rank j, and slice i of ``output``
        receives rank i's slice ``rank``. Returns ``output``."""
        self._start_all_to_all(output, input)
        if self.world_size > 1:
            self._all_to_all(output, input)
        else:
            output.copy_(input)
        return output

    def all_to_all_async(self, output: torch.Tensor, input: torch.Tensor) -> Work:
        """:meth:`all_to_all` started: ``output`` holds the slices once ``wait()`` returns, and neither tensor may be
        touched before. Backends that cannot overlap (the simulator) complete it at once."""
        self._start_all_to_all(output, input)
        if self.world_size == 1:
            output.copy_(input)
            return Completed()
        return self._all_to_all_async(output, input)

    def _start_all_to_all(self, output: torch.Tensor, input: torch.Tensor) -> None:
        if input.numel() != output.numel() or input.numel() % self.world_size:
            raise ValueError(
                f"all_to_all: input ({input.numel()}) and output ({output.numel()}) must have the same number of "
                f"elements, a multiple of world_size {self.world_size}"
            )
        _same_dtype("all_to_all", output, input)
        self._count("all_to_all", (self.world_size - 1) * _nbytes(input) // self.world_size)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """In place: every rank gets rank ``src``'s ``tensor``."""
        last_of_chain = (src - 1) % self.world_size
        self._count("broadcast", 0 if self.rank == last_of_chain else _nbytes(tensor))
        if self.world_size > 1:
            self._broadcast(tensor, src)
        return tensor

    def barrier(self) -> None:
        """Wait until every rank of the group has reached this point."""
        if self.world_size > 1:
            self._barrier()

    # ----------------------------------------------------------------------------------- point to point
    def isend(self, tensor: torch.Tensor, dst: int) -> Work:
        """Start sending ``tensor`` to rank ``dst``; the tensor must stay unchanged until ``wait()``."""
        self._check_peer(dst)
        self._count("send", _nbytes(tensor))
        return self._isend(tensor, dst)

    def irecv(self, tensor: torch.Tensor, src: int) -> Work:
        """Start receiving into ``tensor`` from rank ``src``; its content is valid after ``wait()``."""
        self._check_peer(src)
        return self._irecv(tensor, src)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.isend(tensor, dst).wait()

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        self.irecv(tensor, src).wait()

    # ----------------------------------------------------------------------------------- groups
    def split_nodes(self, procs_per_node: int) -> tuple[Communicator, Communicator]:
        """Split the world into nodes of ``procs_per_node`` consecutive ranks.

        Returns ``(node, cross)``: ``node`` groups the ranks of this rank's node; ``cross`` groups the
        ranks holding the same local index on every node (the group the base algorithm runs on, as the
        paper's DGX-1 setup: all-reduce inside a node, gossip or Local SGD between nodes).
        """
        if procs_per_node < 1 or self.world_size % procs_per_node:
            raise ValueError(
                f"world size {self.world_size} is not divisible by procs_per_node={procs_per_node}; "
                "launch a whole number of nodes or set procs_per_node to the processes on each node"
            )
        nodes = self.world_size // procs_per_node
        node_groups = [[node * procs_per_node + j for j in range(procs_per_node)] for node in range(nodes)]
        cross_groups = [[node * procs_per_node + j for node in range(nodes)] for j in range(procs_per_node)]
        return self._new_group(node_groups, "node/"), self._new_group(cross_groups, "cross/")

    # ----------------------------------------------------------------------------------- time
    def computed(self) -> None:
        """An inner step's computation is done: on a virtual clock (:mod:`slowmo.comm.clock`) this rank's time
        advances by its compute time; nothing where time is real."""
        return None

    def time(self) -> float | None:
        """This rank's time on a virtual clock, seconds; None where time is real."""
        return None

    # ----------------------------------------------------------------------------------- membership
    @property
    def seat(self) -> tuple[int, int]:
        """(i, n): this rank's place among all the job's ranks, which fixes its data shard and random stream (an
        elastic replica keeps its seat while the quorum around it changes)."""
        return self.rank, self.world_size

    def local(self) -> Communicator:
        """The group of the training loop's own agreements (losses, stop signals, checkpoints): this one, or, for an
        elastic replica, the replica alone."""
        return self

    def join(self, state: Callable[[], dict[str, Any]], load: Callable[[dict[str, Any]], None]) -> None:
        """Before the first inner step: a replica that can join a running job receives its peers' ``state()`` through
        ``load``. A fixed group has nothing to do."""
        return None

    def commit(self) -> bool:
        """The vote on the outer step just averaged: whether every rank may apply it. Always yes in a fixed group."""
        return True

    def on_round(self, log: Callable[[dict[str, Any]], None]) -> None:
        """Have ``log`` record each round's vote (who took part, whether it committed); a fixed group has none."""
        return None

    def next_round(self, last: bool = False) -> None:
        """After a vote, the group of the next round (none after the ``last`` step); nothing in a fixed group."""
        return None

    def report(self) -> dict[str, Any]:
        """What the run's summary says of the group's membership, under keys of its own (nothing for a fixed group)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the group itself: an elastic group's membership, a virtual clock's time (nothing
        for a fixed group in real time)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    # ----------------------------------------------------------------------------------- accounting
    def stats(self) -> dict[str, int]:
        """Bytes this rank has sent, per operation kind (sub-groups prefixed ``node/``, ``cross/``; control traffic
        ``control/``), and ``total``."""
        out = dict(sorted(self._bytes.items()))
        out["total"] = sum(self._bytes.values())
        return out

    def reset_stats(self) -> None:
        self._bytes.clear()

    def restore_stats(self, stats: dict[str, int]) -> None:
        """The counters as :meth:`stats` gave them (``total`` ignored): a resumed run counts on where it stopped."""
        self._bytes.clear()
        self._bytes.update({kind: nbytes for kind, nbytes in stats.items() if kind != "total"})

    @contextmanager
    def uncounted(self) -> Iterator[None]:
        """Operations inside are not counted (metrics, evaluation, checkpoint barriers: not training traffic)."""
        saved, self._bytes.counting = self._bytes.counting, False
        try:
            yield
        finally:
            self._bytes.counting = saved

    @contextmanager
    def control(self) -> Iterator[None]:
        """Operations inside are control traffic (e.g. the ranks agreeing to skip an fp16 step): counted, under
        ``control/<kind>``, apart from the algorithm's own traffic."""
        saved, self._bytes.purpose = self._bytes.purpose, "control/"
        try:
            yield
        finally:
            self._bytes.purpose = saved

    def record(self, kind: str, nbytes: int) -> None:
        """Count ``nbytes`` this rank sent in a collective of ``kind`` that ran outside this communicator (FSDP's)."""
        self._count(kind, nbytes)

    def _count(self, kind: str, nbytes: int) -> None:
        if self._bytes.counting:
            self._bytes[self._bytes.purpose + self.label + kind] += nbytes

    def _check_peer(self, peer: int) -> None:
        if not 0 <= peer < self.world_size or peer == self.rank:
            raise ValueError(f"rank {self.rank}: invalid peer {peer} for a group of {self.world_size} ranks")

    # ----------------------------------------------------------------------------------- backend primitives
    @abstractmethod
    def _all_reduce(self, tensor: torch.Tensor) -> None: ...

    def _all_reduce_async(self, tensor: torch.Tensor) -> Work:
        """Default: a blocking all-reduce, complete at once (backends that overlap override this)."""
        self._all_reduce(tensor)
        return Completed()

    def _all_to_all_async(self, output: torch.Tensor, input: torch.Tensor) -> Work:
        """Default: a blocking all-to-all, complete at once (backends that overlap override this)."""
        self._all_to_all(output, input)
        return Completed()

    @abstractmethod
    def _reduce_scatter(self, output: torch.Tensor, input: torch.Tensor) -> None: ...

    @abstractmethod
    def _all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None: ...

    @abstractmethod
    def _all_to_all(self, output: torch.Tensor, input: torch.Tensor) -> None: ...

    @abstractmethod
    def _broadcast(self, tensor: torch.Tensor, src: int) -> None: ...

    @abstractmethod
    def _barrier(self) -> None: ...

    @abstractmethod
    def _isend(self, tensor: torch.Tensor, dst: int) -> Work: ...

    @abstractmethod
    def _irecv(self, tensor: torch.Tensor, src: int) -> Work: ...

    @abstractmethod
    def _new_group(self, partition: list[list[int]], label: str) -> Communicator:
        """Every rank calls this with the same partition of the world; returns this rank's group."""


class Single(Communicator):
    """A world of one rank (e.g. Lookahead): collectives are identities, there are no peers."""

    def __init__(self) -> None:
        super().__init__(0, 1)

    def _all_reduce(self, tensor: torch.Tensor) -> None:  # pragma: no cover - world_size 1 never calls
        pass

    _reduce_scatter = _all_gather = _all_to_all = _broadcast = _barrier = _all_reduce  # type: ignore[assignment]

    def _isend(self, tensor: torch.Tensor, dst: int) -> Work:  # pragma: no cover - _check_peer rejects
        raise ValueError("a single-rank communicator has no peers")

    _irecv = _isend  # type: ignore[assignment]

    def _new_group(self, partition: list[list[int]], label: str) -> Communicator:
        return self


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _same_dtype(op: str, output: torch.Tensor, input: torch.Tensor) -> None:
    if output.dtype != input.dtype:
        raise ValueError(f"{op}: output is {output.dtype} but input is {input.dtype}; use one dtype for both")
