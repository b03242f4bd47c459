"""``spawn(fn, world_size, backend)``: run ``fn(comm, *args)`` on every rank and collect the results in rank order.

``backend="simulated"`` runs the ranks as threads of this process (:mod:`slowmo.comm.simulated`); ``"gloo"`` and
``"nccl"`` start one real process per rank, which rendezvous on 127.0.0.1 at a free port. The processes are forked by
a fork server that has imported torch and slowmo once (the first call starts it, in about the time one spawned
process takes to start; later calls start their ranks in milliseconds). Each rank gets the launcher's environment,
working directory and ``sys.path`` of the moment of the call. ``fn`` must be importable by name (defined at the top
level of a module file) and its results picklable; both are checked before any process starts.

The launcher and its rank processes behave as one program:

- **Signals.** SIGTERM, SIGUSR1, SIGUSR2 and SIGINT sent to the launcher are passed on to every rank. The ranks run in
  a process group of their own, so a Ctrl-C in the terminal reaches them once, through the launcher; what a rank does
  with a signal is its own choice (the training loop checkpoints and stops, :mod:`slowmo.train.preemption`). A second
  SIGINT raises ``KeyboardInterrupt`` here and in the ranks, which get 2 s to unwind before they are killed.
- **No rank outlives its launcher.** A rank is killed when the launcher dies, however it dies (kill -9 included), and
  when the launcher leaves :func:`spawn` early.
- **Errors.** The exception a rank raised is raised again here, as the simulator does: the first rank's (in rank
  order) that is not a :class:`~slowmo.comm.CommError` (the peers' reaction to it), with every rank's outcome and
  that rank's traceback attached as notes. Ranks that died without reporting (killed, or lost) give
  :class:`RanksFailed`, which names each rank's fate.
"""

from __future__ import annotations

import ast
import multiprocessing
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.multiprocessing as mp  # registers torch's reductions (tensors in ``args``)

from .base import CommError
from .clock import Clock
from .simulated import run_simulated

BACKENDS = ("simulated", "gloo", "nccl")
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
_PRELOAD = ["__main__", "torch", "slowmo.train"]  # what the fork server imports once for every rank
_UNWIND_S = 2.0  # after a second SIGINT, how long the ranks have to unwind before they are killed


class RanksFailed(CommError):
    """Ranks of a multi-process run died or lost their peers; the message has one line per rank that failed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def master_port(environ: dict[str, str] | None = None) -> int:
    """The rendezvous port of local ranks: ``MASTER_PORT`` when it is set (as torchrun takes it), else a free one.
    ValueError (one line) for a value that is not a port, or a port something listens on."""
    given = (os.environ if environ is None else environ).get("MASTER_PORT", "")
    if not given:
        return free_port()
    if not given.isdigit() or not 0 < int(given) < 65536:
        raise ValueError(f"MASTER_PORT={given!r} is not a port number; set a free port (1-65535) or unset it")
    from .launch import check_port_free  # (spawn stays importable before torch.distributed)

    check_port_free("127.0.0.1", int(given))
    return int(given)


def spawn(
    fn: Callable[..., Any],
    world_size: int = 4,
    backend: str = "simulated",
    args: tuple = (),
    timeout: float = 300.0,
    preload: Sequence[str] = (),
    clock: Clock | None = None,
) -> list[Any]:
    """Run ``fn(comm, *args)`` on ``world_size`` ranks; return the list of per-rank results (rank order).

    ``timeout`` bounds every wait for a peer (seconds): a rank that dies or hangs makes the others fail with a
    :class:`~slowmo.comm.CommError` instead of hanging. An exception on any rank is re-raised here. ``preload``: modules
    the fork server imports once for all ranks, besides torch and slowmo (it starts at the first call of a process;
    later calls cannot add to it). ``clock``: the simulated ranks' virtual time (:mod:`slowmo.comm.clock`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend == "simulated":
        return run_simulated(fn, world_size, args, timeout, clock)
    if clock is not None:
        raise ValueError("a virtual clock runs on the simulator's ranks: backend='simulated'")
    _check_importable(fn, backend)
    outcomes = _run_processes(fn, world_size, backend, args, timeout, preload)
    if outcomes is None:  # a second SIGINT: the ranks were killed
        raise KeyboardInterrupt
    return _results(outcomes, world_size)


def _run_processes(fn, world_size, backend, args, timeout, preload) -> dict[int, _Outcome] | None:
    """Start the ranks, pass signals on to them, wait for every one; None if a second SIGINT stopped them."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([*_PRELOAD, *preload])
    queue = ctx.SimpleQueue()
    port = master_port()
    launcher = (os.getpid(), dict(os.environ))  # the fork server's environment is that of its own start
    procs = [
        ctx.Process(target=_process_main, args=(fn, rank, world_size, backend, port, args, timeout, queue, launcher))
        for rank in range(world_size)
    ]
    with _Forwarding(procs) as forwarding:
        try:
            for proc in procs:
                proc.start()
            forwarding.starting = False
            if forwarding.interrupts > 1:
                raise KeyboardInterrupt
            return _collect(procs, queue)
        except KeyboardInterrupt:  # raised by _Forwarding: the ranks, interrupted too, get a moment to unwind
            deadline = time.time() + _UNWIND_S
            for proc in procs:
                if proc.pid is not None:
                    proc.join(timeout=max(0.0, deadline - time.time()))
                    if proc.exitcode is None:
                        proc.kill()
            return None
        finally:
            for proc in procs:
                if proc.pid is not None:
                    proc.join()
                    proc.close()  # lets the queue, whose locks the ranks shared, go with this call


# ------------------------------------------------------------------------------------------------ before start
def _check_importable(fn: Callable[..., Any], backend: str) -> None:
    """The rank processes import ``fn`` by name: refuse, in one line, what they cannot import or what would start the
    ranks again as they import the script."""
    name = getattr(fn, "__qualname__", repr(fn))
    if "<lambda>" in name or "<locals>" in name:
        raise ValueError(
            f"spawn(backend={backend!r}) runs {name} in new processes, which import it by name; define it with def "
            "at the top level of a module file (or use backend='simulated')"
        )
    if getattr(fn, "__module__", None) != "__main__":
        return
    main = sys.modules["__main__"]
    path = getattr(main, "__file__", None)
    if path is None or not os.path.isfile(path):
        raise ValueError(
            f"spawn(backend={backend!r}) runs {name} in new processes, which import it from the script, but this "
            "__main__ has no file (python -c, standard input, a notebook); put it in a .py file, or use "
            "backend='simulated'"
        )
    line = _call_site_in(path)
    if line is not None and not _under_main_guard(path, line):
        raise ValueError(
            f"{os.path.basename(path)}, line {line}: spawn(backend={backend!r}) is called at the top level of the "
            "script, and every rank process imports the script (to find "
            f'{name}), which would start the ranks again; put the call under if __name__ == "__main__":'
        )


def _call_site_in(path: str) -> int | None:
    """The line of ``path``'s top-level statement being run now (the one that, directly or not, called spawn)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and os.path.abspath(frame.f_code.co_filename) == os.path.abspath(path):
            return frame.f_lineno
        frame = frame.f_back
    return None


def _under_main_guard(path: str, line: int) -> bool:
    """Whether ``line`` lies inside a top-level ``if __name__ == "__main__":`` block of ``path``."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if (
            isinstance(node, ast.If)
            and node.lineno <= line <= (node.end_lineno or node.lineno)
            and "__main__" in ast.unparse(node.test)
            and "__name__" in ast.unparse(node.test)
        ):
            return True
    return False


# ------------------------------------------------------------------------------------------------ while running
class _Forwarding:
    """While the ranks run: pass the signals this launcher receives on to them (main thread only; Python installs
    handlers nowhere else). The second SIGINT raises KeyboardInterrupt, which stops the ranks at once."""

    def __init__(self, procs: list[multiprocessing.Process]) -> None:
        self.procs = procs
        self.previous: dict[int, Any] = {}
        self.interrupts = 0
        self.starting = True  # no KeyboardInterrupt while a rank is half started (it could not be stopped)

    def __enter__(self) -> _Forwarding:
        if threading.current_thread() is threading.main_thread():
            for sig in FORWARDED:
                self.previous[sig] = signal.signal(sig, self._forward)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _forward(self, signum: int, frame: Any) -> None:
        for proc in self.procs:
            if proc.pid is not None and proc.exitcode is None:
                try:
                    os.kill(proc.pid, signum)
                except ProcessLookupError:
                    pass
        self.interrupts += signum == signal.SIGINT
        if self.interrupts > 1 and not self.starting:
            raise KeyboardInterrupt


@dataclass
class _Outcome:
    ok: bool
    value: Any = None  # the result (ok), or the exception the rank raised (None if it could not be sent)
    text: str = ""  # the traceback, or how the process ended


def _collect(procs: list[multiprocessing.Process], queue: Any) -> dict[int, _Outcome]:
    outcomes: dict[int, _Outcome] = {}
    while len(outcomes) < len(procs):
        if queue.empty():
            dead = [r for r, p in enumerate(procs) if r not in outcomes and p.exitcode is not None]
            if dead and queue.empty():  # died without a word (killed, or failed while starting)
                for r in dead:
                    outcomes[r] = _Outcome(False, None, _death(procs[r].exitcode))
            time.sleep(0.01)
            continue
        rank, ok, payload = queue.get()
        if ok:
            outcomes[rank] = _Outcome(True, pickle.loads(payload))
        else:
            error, text = payload
            outcomes[rank] = _Outcome(False, _unpickled(error), text)
    return outcomes


def _unpickled(data: bytes | None) -> BaseException | None:
    try:
        return pickle.loads(data) if data is not None else None
    except Exception:  # noqa: BLE001 - an exception class this process cannot rebuild: its traceback still tells
        return None


def _death(exitcode: int) -> str:
    if exitcode < 0:
        return f"process killed by {signal.Signals(-exitcode).name} before reporting: this is the lost rank"
    return f"process exited with code {exitcode} before reporting: this is the lost rank"


def _results(outcomes: dict[int, _Outcome], world_size: int) -> list[Any]:
    failed = {r: o for r, o in sorted(outcomes.items()) if not o.ok}
    if not failed:
        return [outcomes[r].value for r in range(world_size)]
    lines = [f"rank {r}: {_last_line(o)}" for r, o in failed.items()]
    summary = f"{len(failed)} of {world_size} ranks failed:\n" + "\n".join(lines)
    cause = next((r for r, o in failed.items() if o.value is not None and not isinstance(o.value, CommError)), None)
    if cause is None:
        raise RanksFailed(summary)
    error = failed[cause].value
    error.add_note(summary)
    error.add_note(f"rank {cause}'s traceback:\n{failed[cause].text.rstrip()}")
    raise error


def _last_line(outcome: _Outcome) -> str:
    lines = outcome.text.strip().splitlines()
    return lines[-1] if lines else "failed"


# ------------------------------------------------------------------------------------------------ in a rank
def _process_main(fn, rank, world_size, backend, port, args, timeout, queue, launcher) -> None:
    """One rank: detach from the terminal's Ctrl-C (the launcher passes it on), die with the launcher, take its
    environment (multiprocessing has already taken its working directory and ``sys.path``), then run ``fn`` and
    report its result or its exception."""
    os.setpgrp()
    pid, environ = launcher
    _die_with(pid)
    os.environ.clear()
    os.environ.update(environ)
    import torch
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
    except BaseException as error:  # noqa: BLE001 - reported to the launcher, which raises it again
        try:
            sent = pickle.dumps(error)
        except Exception:  # noqa: BLE001 - not picklable: the traceback alone tells the launcher
            sent = None
        queue.put((rank, False, (sent, traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _die_with(launcher: int) -> None:
    """SIGKILL this process when the launcher goes, however it goes (a watcher thread on a pidfd of it; where Linux
    has none, a poll each second). Its parent is the fork server, which outlives the launcher while ranks live."""
    try:
        watched = os.pidfd_open(launcher)
    except ProcessLookupError:  # the launcher went before this rank started
        os._exit(1)
    except (AttributeError, OSError):  # not Linux >= 5.3
        watched = None

    def watch() -> None:
        if watched is not None:
            select.select([watched], [], [])  # readable once the launcher has exited
        else:
            while _alive(launcher):
                time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="slowmo-launcher-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
