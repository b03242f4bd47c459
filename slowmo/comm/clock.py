"""A virtual clock for the simulator (``dist=simulated``, ``dist/clock=<scenario>``): time as the cluster would see it,
whatever the host's load.

Every rank has its own time. An inner step advances it by that rank's compute time: ``step_ms`` (a profile's
milliseconds per step at speed 1) divided by the rank's speed (``speeds``, cycled over the ranks), times a straggler's
``slowdown`` on the steps a seeded draw picks (each step of each rank with probability ``straggle``). A communication
completes when its last participant has arrived plus its transfer time, from a link model: ``latency_ms`` per message
and the bandwidth between the ranks' regions (``regions``: the ranks cut into that many consecutive groups;
``inside_gbps`` within one, ``between_gbps`` between two, a matrix or one number; null: no limit). The slowest link a
collective crosses sets its pace:

    all_reduce (ring)              2 (n - 1) (latency + B / (n bw))
    reduce_scatter, all_gather,      (n - 1) (latency + B / (n bw))      B: the whole buffer
    all_to_all (pairwise)
    broadcast (pipelined chain)      (n - 1) latency + B / bw
    barrier                          (n - 1) latency
    send                             latency + B / bw(src, dst)

A group's collectives go over its links one after another (as NCCL runs a communicator's operations in order): one
starts at its last participant's arrival or when the group's previous one is done, whichever is later; a rank's
messages leave one after another (its link is busy for the bytes of the previous one). A blocking operation moves
each participant's time to the completion; one started asynchronously (a bucket of the gradient mean, the eager mean,
a fragment's mean in flight, OSGP's messages) completes on the clock while the rank computes, and its ``wait()``
moves the rank's time to the completion only if that is later. Different groups' operations (a node's and the
cross-node group's) do not share links. Only training's own operations take time (those the byte
counters count): the harness's bookkeeping (evaluation, the loss records, the stop-signal agreements) runs off the
clock. The clock changes no number of a synchronous algorithm: equal speeds and no link limits give back the runs
without it bit for bit.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from ..registry import ConfigError

ORDER = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "broadcast", "barrier")


@dataclass
class ClockConfig:
    """``dist/clock=<scenario>`` (configs/dist/clock/<scenario>.yaml)."""

    name: str  # the scenario (its file)
    step_ms: float  # compute time of one inner step at speed 1, milliseconds
    speeds: list[float]  # each rank's speed (cycled over the ranks; [1.0]: all equal)
    straggle: float  # probability that a rank's step is a straggler's (0: none)
    slowdown: float  # a straggler's step takes this many times as long
    latency_ms: float  # per message
    regions: int  # the ranks cut into this many consecutive groups (nodes, regions)
    inside_gbps: float | None  # bandwidth inside a region, Gbit/s; null: no limit
    between_gbps: Any  # between two regions: one number, a regions x regions matrix, or null (no limit)

    def check(self, world_size: int) -> None:
        """ConfigError (one line) for a setting out of its range, or regions that do not divide the ``world_size``
        ranks."""
        if not self.step_ms >= 0 or not math.isfinite(self.step_ms):
            raise ConfigError(f"dist.clock.step_ms must be a time >= 0 (ms per inner step), got {self.step_ms}")
        if not self.speeds or any(not s > 0 or not math.isfinite(s) for s in self.speeds):
            raise ConfigError(f"dist.clock.speeds must be finite speeds > 0 (1.0: the profile's), got {self.speeds}")
        if not 0 <= self.straggle <= 1 or not self.slowdown >= 1:
            raise ConfigError(
                f"dist.clock.straggle must be a probability and dist.clock.slowdown >= 1, got {self.straggle} and "
                f"{self.slowdown}"
            )
        if not self.latency_ms >= 0 or self.regions < 1:
            raise ConfigError(
                f"dist.clock.latency_ms must be >= 0 and dist.clock.regions >= 1, got {self.latency_ms} and "
                f"{self.regions}"
            )
        between = self.between_gbps
        matrix = between if isinstance(between, list) else None
        if not (matrix is not None or between is None or isinstance(between, int | float)):
            raise ConfigError(f"dist.clock.between_gbps must be a number, a matrix or null, got {between!r}")
        if matrix is not None and (len(matrix) != self.regions or any(len(row) != self.regions for row in matrix)):
            raise ConfigError(
                f"dist.clock.between_gbps must be one number or a {self.regions} x {self.regions} matrix "
                f"(dist.clock.regions), got {between}"
            )
        rates = [self.inside_gbps, *(sum(matrix, []) if matrix is not None else [between])]
        if any(rate is not None and not rate > 0 for rate in rates):
            raise ConfigError(f"dist.clock's bandwidths must be > 0 Gbit/s or null (no limit), got {rates}")
        if world_size % self.regions:
            raise ConfigError(
                f"dist.clock.regions={self.regions} does not divide the dist.world_size={world_size} ranks into equal "
                "regions"
            )


class Clock:
    """The time of each of ``world_size`` ranks, in seconds, advanced as :mod:`slowmo.comm.clock` says."""

    def __init__(self, cfg: ClockConfig, world_size: int, seed: int = 0) -> None:
        cfg.check(world_size)
        self.cfg, self.world_size, self.seed = cfg, world_size, seed
        self.now = [0.0] * world_size  # each rank's time, seconds
        self.steps = [0] * world_size  # each rank's inner steps so far
        self.sending = [0.0] * world_size  # when each rank's link is done with the messages it sent
        self.busy: dict[tuple[int, ...], float] = {}  # when each group is done with its last collective
        self._per_region = world_size // cfg.regions

    # ----------------------------------------------------------------------------------- compute
    def step_time(self, rank: int, step: int) -> float:
        """Seconds of inner step ``step`` of ``rank`` (a straggler's by a draw seeded by the run, the rank and the
        step: the same in a resumed run)."""
        cfg = self.cfg
        seconds = cfg.step_ms / 1000.0 / cfg.speeds[rank % len(cfg.speeds)]
        if cfg.straggle and random.Random(f"{self.seed}/{rank}/{step}").random() < cfg.straggle:
            seconds *= cfg.slowdown
        return seconds

    def compute(self, rank: int) -> None:
        """An inner step of ``rank``'s: its time advances by :meth:`step_time`."""
        self.now[rank] += self.step_time(rank, self.steps[rank])
        self.steps[rank] += 1

    # ----------------------------------------------------------------------------------- communication
    def bandwidth(self, a: int, b: int) -> float:
        """Bytes per second from rank ``a`` to rank ``b`` (inf: no limit)."""
        cfg = self.cfg
        ra, rb = a // self._per_region, b // self._per_region
        if ra == rb:
            gbps = cfg.inside_gbps
        else:
            between = cfg.between_gbps
            gbps = between[ra][rb] if isinstance(between, list) else between
        return math.inf if gbps is None else gbps * 1e9 / 8

    def transfer(self, kind: str, nbytes: int, ranks: tuple[int, ...]) -> float:
        """Seconds a collective of ``kind`` over the world ranks ``ranks`` (ring order) takes on ``nbytes`` (the
        buffer each rank holds: the input of an all-reduce, reduce-scatter or all-to-all, the output of an
        all-gather, the tensor of a broadcast)."""
        n = len(ranks)
        if n < 2:
            return 0.0
        latency = self.cfg.latency_ms / 1000.0
        slowest = min(self.bandwidth(ranks[i], ranks[(i + 1) % n]) for i in range(n))
        piece = nbytes / n / slowest
        if kind == "all_reduce":
            return 2 * (n - 1) * (latency + piece)
        if kind in ("reduce_scatter", "all_gather", "all_to_all"):
            return (n - 1) * (latency + piece)
        if kind == "broadcast":
            return (n - 1) * latency + nbytes / slowest
        if kind == "barrier":
            return (n - 1) * latency
        raise ValueError(f"the clock has no model of a {kind!r}; it knows {', '.join(ORDER)}")

    def complete(self, kind: str, nbytes: int, ranks: tuple[int, ...], last_arrival: float) -> float:
        """When a collective of the group ``ranks`` whose last participant arrived at ``last_arrival`` is done (after
        the group's previous one)."""
        done = max(last_arrival, self.busy.get(ranks, 0.0)) + self.transfer(kind, nbytes, ranks)
        self.busy[ranks] = done
        return done

    def arrival(self, src: int, dst: int, nbytes: int) -> float:
        """When a message of ``nbytes`` that world rank ``src`` sends now has reached ``dst`` (it leaves once the
        sender's link is done with its previous messages)."""
        start = max(self.now[src], self.sending[src])
        self.sending[src] = start + nbytes / self.bandwidth(src, dst)
        return self.sending[src] + self.cfg.latency_ms / 1000.0
