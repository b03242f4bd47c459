"""``spawn(fn, world_size, backend)``: run ``fn(comm, *args)`` on every rank and collect the results in rank order.

``backend="simulated"`` runs the ranks as threads of this process (:mod:`slowmo.comm.simulated`);
``"gloo"`` and ``"nccl"`` start real processes that rendezvous on 127.0.0.1 at a free port. With real processes,
``fn`` must be importable (defined at module level) and its results picklable.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from .simulated import run_simulated

BACKENDS = ("simulated", "gloo", "nccl")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(
    fn: Callable[..., Any], world_size: int = 4, backend: str = "simulated", args: tuple = (), timeout: float = 300.0
) -> list[Any]:
    """Run ``fn(comm, *args)`` on ``world_size`` ranks; return the list of per-rank results (rank order).

    ``timeout`` bounds every wait for a peer (seconds): a rank that dies or hangs makes the others fail with a
    :class:`~slowmo.comm.CommError` instead of hanging. An exception on any rank is re-raised here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend == "simulated":
        return run_simulated(fn, world_size, args, timeout)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_process_main, args=(fn, rank, world_size, backend, port, args, timeout, queue), daemon=False
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: list[Any] = [None] * world_size
    failures: dict[int, str] = {}  # rank -> "rank r:\n<what happened>"
    reported: set[int] = set()
    while len(reported) < world_size:
        if queue.empty():
            dead = [r for r, p in enumerate(procs) if r not in reported and p.exitcode is not None]
            if dead and queue.empty():  # died without a word (killed, or failed while starting)
                for r in dead:
                    reported.add(r)
                    failures[r] = f"rank {r}:\n{_death(procs[r].exitcode)}"
            time.sleep(0.01)
            continue
        rank, ok, value = queue.get()
        reported.add(rank)
        if ok:
            results[rank] = pickle.loads(value)
        else:
            failures[rank] = value
    for proc in procs:
        proc.join()
    if failures:
        ordered = [failures[r] for r in sorted(failures)]  # by rank number (rank 10 after rank 9)
        summary = "\n".join(f.strip().splitlines()[0] + " " + f.strip().splitlines()[-1] for f in ordered)
        tracebacks = [f for f in ordered if "Traceback" in f]
        root = next(
            (f for f in tracebacks if "CommError" not in f.strip().splitlines()[-1]),
            tracebacks[0] if tracebacks else "",
        )
        raise RuntimeError(f"{len(failures)} of {world_size} ranks failed:\n{summary}\nfirst cause:\n{root}")
    return results


def _death(exitcode: int) -> str:
    if exitcode < 0:
        return f"process killed by {signal.Signals(-exitcode).name} before reporting: this is the lost rank"
    return f"process exited with code {exitcode} before reporting: this is the lost rank"


def _process_main(fn, rank, world_size, backend, port, args, timeout, queue) -> None:
    import torch.distributed as dist

    from .launch import DistEnv, init_distributed, threads_per_rank  # in the child: keeps spawn importable early

    env = DistEnv(rank, world_size, rank, world_size, "127.0.0.1", port, "spawn")
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    try:
        torch.set_num_threads(threads_per_rank(local_world_size=world_size))
        comm = init_distributed(backend, timeout, env)
        result = fn(comm, *args)
        queue.put((rank, True, pickle.dumps(result)))  # plain bytes: no shared memory to outlive us
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        queue.put((rank, False, f"rank {rank}:\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
