"""Preemption: SLURM warns a job before its time limit or a preemption (``--signal=USR1@120``; submitit uses
USR2), the ranks agree to stop, write a checkpoint, and the job asks to be run again.

- SIGUSR1 / SIGUSR2 mean "you will be stopped soon": after the checkpoint the job is requeued, through submitit's
  own handler when submitit launched it (so that its count of requeues is kept), otherwise by rank 0 running
  ``scontrol requeue $SLURM_JOB_ID``. The requeued job resumes from the checkpoint (``train.resume=auto``).
- SIGTERM means "stop now" (``scancel``, or SLURM's own preempt-and-requeue): checkpoint and exit, no requeue.

The loop polls :data:`STOP`; the ranks agree on it every ``train.signal_check_every`` steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Any

STOP = threading.Event()
WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)
_received: list[int] = []
_previous: dict[int, Any] = {}  # the handlers found at install time (submitit's, under submitit)


def install() -> None:
    """Catch SIGTERM, SIGUSR1 and SIGUSR2 (main thread only; elsewhere Python cannot install handlers)."""
    STOP.clear()
    _received.clear()
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, *WARNINGS):
        current = signal.getsignal(sig)
        if current is not _on_signal:
            _previous[sig] = current
            signal.signal(sig, _on_signal)


def _on_signal(signum: int, frame: Any) -> None:
    _received.append(signum)
    STOP.set()


def requeue_wanted() -> bool:
    """A warning signal arrived inside a SLURM job: the job should run again."""
    return any(sig in WARNINGS for sig in _received) and "SLURM_JOB_ID" in os.environ


def requeue(rank: int) -> None:
    """Called once the preemption checkpoint is written: requeue the job if :func:`requeue_wanted`."""
    if not requeue_wanted():
        return
    submitit = next((h for h in _previous.values() if getattr(h, "__name__", "") == "checkpoint_and_try_requeue"), None)
    if submitit is not None:
        submitit(_received[-1], None)  # rank 0 requeues and exits; the other ranks return
    elif rank == 0:
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]], check=True, timeout=60, capture_output=True)
