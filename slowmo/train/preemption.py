"""Stopping a run by a signal: the ranks agree to stop, write a checkpoint and exit, so that the run resumes where it
stopped.

- SIGUSR1 / SIGUSR2 mean "you will be stopped soon" (SLURM's ``--signal=USR1@120``; submitit uses USR2): after the
  checkpoint the job is requeued, through submitit's own handler when submitit launched it (so that its count of
  requeues is kept), otherwise by rank 0 running ``scontrol requeue $SLURM_JOB_ID``. The requeued job resumes from the
  checkpoint (``train.resume=auto``).
- SIGTERM means "stop now" (``kill``, ``scancel``, or SLURM's own preempt-and-requeue): checkpoint and exit with code
  3, no requeue.
- SIGINT (Ctrl-C) does the same and exits with code 130; a second SIGINT stops at once, without a checkpoint.

Every launcher delivers them to every rank: torchrun and srun signal each rank process, the local launcher passes on
what it receives (:func:`slowmo.comm.spawn`), and simulated ranks share this process's handlers. The loop polls
:data:`STOP`; the ranks agree on it every ``train.signal_check_every`` steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..comm import Communicator

STOP = threading.Event()
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
WARNINGS = ("SIGUSR1", "SIGUSR2")
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports a program stopped by Ctrl-C
REQUEUE_EXIT_CODE = 3  # a run stopped by SIGTERM/SIGUSR1/SIGUSR2 that wrote its checkpoint
_received: list[str] = []
_previous: dict[int, Any] = {}  # the handlers found at install time (submitit's, under submitit)
_announce = False


@contextmanager
def caught(announce: bool = False) -> Iterator[None]:
    """Catch the stop signals in this process while the block runs, then restore the handlers found. Only from the
    main thread (Python installs handlers nowhere else; simulated ranks, which are threads, share the main thread's),
    and only once: an inner ``caught`` (a rank inside a launcher that already catches) changes nothing. ``announce``:
    this process speaks for the run, and says on stderr what happens next when a signal comes."""
    global _announce
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is _on_signal:
        yield
        return
    STOP.clear()
    _received.clear()
    _announce = announce
    found = {sig: signal.signal(sig, _on_signal) for sig in SIGNALS}
    _previous.update(found)
    try:
        yield
    finally:
        for sig, handler in found.items():
            signal.signal(sig, handler)


def _on_signal(signum: int, frame: Any) -> None:
    name = signal.Signals(signum).name
    if name == "SIGINT" and "SIGINT" in _received:
        raise KeyboardInterrupt  # the second Ctrl-C: at once, without a checkpoint
    _received.append(name)
    if _announce and len(_received) == 1:
        then = "press Ctrl-C again to stop at once, without it" if name == "SIGINT" else "then exit"
        print(
            f"{name}: the ranks stop at their next agreement, after a checkpoint; {then}", file=sys.stderr, flush=True
        )
    STOP.set()


def received() -> str | None:
    """The first stop signal this process received (``"SIGTERM"``, ...), if any."""
    return _received[0] if _received else None


def exit_code(signal_name: str) -> int:
    """130 for a run stopped by Ctrl-C, 3 (requeue me) for one stopped by SIGTERM, SIGUSR1 or SIGUSR2."""
    return INTERRUPTED_EXIT_CODE if signal_name == "SIGINT" else REQUEUE_EXIT_CODE


def requeue_wanted(signal_name: str) -> bool:
    """A warning signal stopped a run inside a SLURM job: the job should run again."""
    return signal_name in WARNINGS and "SLURM_JOB_ID" in os.environ


def requeue(rank: int, signal_name: str) -> None:
    """Called once the stop checkpoint is written: requeue the job if :func:`requeue_wanted`."""
    if not requeue_wanted(signal_name):
        return
    submitit = next((h for h in _previous.values() if getattr(h, "__name__", "") == "checkpoint_and_try_requeue"), None)
    if submitit is not None:
        submitit(signal.Signals[signal_name].value, None)  # rank 0 requeues and exits; the other ranks return
    elif rank == 0:
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True, timeout=60, capture_output=True)


def agreed(comm: Communicator, device: torch.device) -> str | None:
    """The stop signal the ranks agree on (the lowest rank's that received one), or None: one all-gather, not
    counted as training traffic."""
    mine = received() if STOP.is_set() else None
    code = torch.tensor([float(signal.Signals[mine].value if mine else 0)], device=device)
    everyone = torch.empty(comm.world_size, device=device)
    with comm.uncounted():
        comm.all_gather(everyone, code)
    first = next((int(c) for c in everyone.tolist() if c), 0)
    return signal.Signals(first).name if first else None
