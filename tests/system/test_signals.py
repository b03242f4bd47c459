"""Signals and the life of a run's processes, through the command line: SIGTERM, SIGUSR1 and SIGINT to the launcher
(gloo and simulated) stop every rank after a checkpoint, with one line each and exit 3 or 130; a second Ctrl-C stops
at once; no rank outlives a launcher killed by SIGKILL; the ranks take the launcher's environment."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from slowmo.train import checkpoint

from command_line import command


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(proc.name))
        except OSError:
            continue
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _gone(pids: list[int], within_s: float = 5.0) -> bool:
    """Whether every process of ``pids`` has ended within ``within_s`` (a busy machine schedules their exit late)."""
    deadline = time.time() + within_s
    while _alive(pids) and time.time() < deadline:
        time.sleep(0.05)
    return not _alive(pids)


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z":
                alive.append(pid)
        except OSError:
            continue
    return alive


def _start(run_dir: Path, backend: str, *args: str) -> subprocess.Popen:
    """A long run (it is stopped by a signal long before its last step), once its ranks have logged step 10."""
    logging = ("logger.log_every=5", "logger.progress=false")
    job = subprocess.Popen(
        command("train.max_steps=100000", *logging, f"hydra.run.dir={run_dir}", *args, backend=backend),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while '"step": 10,' not in (
        (run_dir / "metrics.jsonl").read_text() if (run_dir / "metrics.jsonl").exists() else ""
    ):
        assert job.poll() is None and time.time() < deadline, job.communicate()[1]
        time.sleep(0.05)
    return job


@pytest.mark.parametrize(
    "backend,sig",
    [("gloo", "SIGTERM"), ("gloo", "SIGUSR1"), ("simulated", "SIGTERM"), ("gloo", "SIGINT"), ("simulated", "SIGINT")],
)
def test_a_signal_to_the_launcher_stops_every_rank_after_a_checkpoint(tmp_path, backend, sig):
    run_dir = tmp_path / "run"
    job = _start(run_dir, backend)
    ranks = _descendants(job.pid)
    job.send_signal(signal.Signals[sig])
    out, err = job.communicate(timeout=120)
    stopped = "interrupted" if sig == "SIGINT" else "preempted"
    assert job.returncode == (130 if sig == "SIGINT" else 3), err
    step = int(re.search(rf"^{stopped} at step (\d+): ", err, re.M).group(1))
    then = "press Ctrl-C again to stop at once, without it" if sig == "SIGINT" else "then exit"
    assert err.splitlines() == [  # one line each, no traceback
        f"run directory {run_dir}: a new run; if it stops, rerun with hydra.run.dir={run_dir} to resume it",
        f"{sig}: the ranks stop at their next agreement, after a checkpoint; {then}",
        f"{stopped} at step {step}: checkpoint written to {run_dir}; rerun with hydra.run.dir={run_dir} to resume",
    ]
    assert step % 5 == 0 and step >= 10  # the ranks agree every train.signal_check_every = 5 steps
    assert [d.name for d in checkpoint.sorted_checkpoints(run_dir / "checkpoints")] == [f"step_{step}"]
    summary = json.loads((run_dir / "summary.json").read_text())  # the record of a run that stopped, too
    assert (summary["status"], summary["signal"], summary["steps"]) == (stopped, sig, step)
    assert summary["comm_bytes"] > 0 and json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert checkpoint.candidates(run_dir / "checkpoints", 2)  # saved by both ranks
    assert _gone(ranks)


def test_a_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path):
    run_dir = tmp_path / "run"
    job = _start(run_dir, "gloo", "train.signal_check_every=100000")  # the ranks would not stop by themselves
    ranks = _descendants(job.pid)
    job.send_signal(signal.SIGINT)
    time.sleep(0.5)
    job.send_signal(signal.SIGINT)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130
    assert err.splitlines()[-1] == (
        f"interrupted: stopped at once, without a checkpoint; rerun with hydra.run.dir={run_dir} to resume"
    )
    assert "Traceback" not in err and "leaked" not in err
    time.sleep(0.5)
    assert _gone(ranks)


def test_no_rank_outlives_a_launcher_killed_by_sigkill(tmp_path):
    job = _start(tmp_path / "run", "gloo")
    ranks = _descendants(job.pid)
    assert len(ranks) >= 3  # the fork server and the two ranks
    job.kill()
    job.communicate(timeout=60)
    assert _gone(ranks, within_s=10)


def test_the_ranks_take_the_launchers_environment(tmp_path, monkeypatch):
    # the fork server started with an earlier environment; a rank sees the launcher's of the moment
    from slowmo.comm import spawn

    spawn(_read_mark, 1, "gloo")  # the fork server is running now
    monkeypatch.setenv("SLOWMO_TEST_MARK", "now")
    assert spawn(_read_mark, 2, "gloo") == ["now", "now"]


def _read_mark(comm):
    return os.environ.get("SLOWMO_TEST_MARK")


@pytest.mark.parametrize("backend", ["simulated", "gloo"])
def test_a_run_stopped_by_sigterm_and_resumed_counts_what_an_uninterrupted_run_counts(tmp_path, backend):
    """Every counter of summary.json (bytes by kind, skipped steps) as if the run had never stopped: the counters used
    to start again at 0 on a resume (67.6 MiB reported instead of 107.0)."""
    settings = ("algorithm=sgp", "slowmo=on", "optimizer.lr=0.05", "logger.log_every=5", "logger.progress=false")
    job = _start(tmp_path / "resumed", backend, *settings[:3])
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=120)
    steps = int(re.search(r"^preempted at step (\d+): ", err, re.M).group(1)) + 25
    summaries = []
    for name in ("resumed", "straight"):
        out = subprocess.run(
            command(f"train.max_steps={steps}", *settings, f"hydra.run.dir={tmp_path / name}", backend=backend),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        summaries.append(json.loads((tmp_path / name / "summary.json").read_text()))
    resumed, straight = summaries
    for key in ("steps", "comm_bytes", "comm_bytes_by_kind", "skipped_steps", "final"):
        assert resumed[key] == straight[key], key
    assert resumed["comm_bytes_by_kind"]["all_reduce"] > 0 and resumed["comm_bytes_by_kind"]["send"] > 0
