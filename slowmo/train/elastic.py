"""An elastic run (``dist=torchft``): replicas that leave and join while the others train on.

:func:`run_replica` is one replica: the training loop of :mod:`.loop` over an :class:`~slowmo.comm.elastic.Elastic`
communicator, in the run directory's ``replica_<i>/`` (its own config, metrics, checkpoints and summary). On a cluster
each replica is a job of its own (``dist.replica_id``, ``dist.lighthouse``), listening on this node's address towards
the lighthouse only.

:func:`run_local` starts a lighthouse and ``dist.world_size`` replica processes on this machine, all listening on the
loopback address only, and restarts a replica process that dies or fails (up to ``dist.max_restarts`` times each; it
heals from a live peer as it rejoins), unless the failure is a configuration error or the run's verdict (too few
replicas for ``dist.quorum_timeout_s``), or a stop signal came. It passes stop signals on, and writes the run's own
``summary.json`` whatever the ending (completed, diverged, preempted or failed: the ``elastic`` section holds the
participants of every outer step, the failed commits, the heals and the restarts) and ``metrics.jsonl`` (those of a
replica that stayed), and ``final.pt`` when the run got to the end. ``replicas.json`` says, while it runs, the
lighthouse's address, the launcher's process id and each replica's.

The replicas speak through the launcher (:class:`_Console`): each line a replica writes comes out whole, naming its
replica; in a terminal, each replica's progress bar has a line of its own below them.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, TextIO

import torch.multiprocessing as mp
from omegaconf import OmegaConf
from tqdm import tqdm

from ..comm import CommError, elastic
from ..comm.launch import threads_per_rank
from ..comm.spawn import _PRELOAD, _die_with, _Forwarding
from ..registry import ConfigError
from . import preemption
from .config import Config, to_dict
from .loop import train_rank
from .losses import NonFiniteLoss

_LATE_S = 5.0  # once a replica has finished, how long the others may take to finish before they are stopped
_TOLD = (CommError, ValueError, OSError, NonFiniteLoss)  # errors whose message says it all (ConfigError: a ValueError)
_REFUSED = ValueError  # bad input (ConfigError included): the replica refuses the run, which writes no summary
_FINAL = (_REFUSED, elastic.QuorumTimeout)  # a replica that fails so is not restarted: it would fail again


def replica_dir(run_dir: Path, replica_id: int) -> Path:
    return run_dir / f"replica_{replica_id}"


def run_replica(
    config: Config, run_dir: Path, run_name: str | None, replica_id: int, lighthouse: str, host: str | None = None
) -> dict:
    """Replica ``replica_id`` of the run in ``run_dir``, its listeners on ``host`` (default: this node's address
    towards the lighthouse); returns its summary. Its ``summary.json`` is written whatever the ending, a configuration
    error aside."""
    own = replica_dir(run_dir, replica_id)
    train = dataclasses.replace(config.train, overwrite=False)  # (the launcher discarded the run; a restart resumes)
    config = dataclasses.replace(config, run_dir=str(own), train=train)
    dist = config.dist
    comm = elastic.Elastic(
        replica_id,
        dist.world_size,
        lighthouse,
        dist.min_replicas,
        dist.quorum_timeout_s,
        dist.timeout_s,
        host=host or elastic.address_towards(lighthouse),
        stop=preemption.STOP if config.train.signal_check_every else None,  # (0: stop signals are not acted on)
    )
    try:
        summary = train_rank(comm, config, own, run_name)
    except CommError as error:
        _write_summary(own, _failed(error, comm))
        if comm.timed_out:  # (the loop says where it was: the message changes, the verdict stays)
            raise elastic.QuorumTimeout(str(error)) from None
        raise
    except Exception as error:
        if not isinstance(error, _REFUSED):
            _write_summary(own, _failed(error, comm))
        raise
    finally:
        comm.close()
    if summary["status"] in ("preempted", "interrupted"):  # (the loop writes a summary for a run that got to its end)
        summary = {**summary, **comm.report()}
        _write_summary(own, summary)
    return summary


def _failed(error: BaseException, comm: elastic.Elastic) -> dict[str, Any]:
    return {"status": "failed", "error": _one_line(error), **comm.report(), "rank": 0}


def _one_line(error: BaseException) -> str:
    """An error whole, in one line: the message of one told to the user, else its type and message."""
    text = str(error) if isinstance(error, _TOLD) else f"{type(error).__name__}: {error}"
    return " ".join(line.strip() for line in text.strip().splitlines())


def _write_summary(directory: Path, summary: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "summary.json").write_text(json.dumps({**summary, "run_dir": str(directory)}, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------ the local launcher
def run_local(config: Config, run_dir: Path, run_name: str | None) -> dict[str, Any]:
    """A lighthouse and ``dist.world_size`` replica processes here; returns the run's summary."""
    dist = config.dist
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(to_dict(config)))
    console = _Console(sys.stderr, bars=config.logger.progress and sys.stderr.isatty())
    config = dataclasses.replace(config, logger=dataclasses.replace(config.logger, progress=console.bars))
    lighthouse, address = elastic.start_lighthouse(dist.min_replicas, dist.join_timeout_s, dist.heartbeat_timeout_s)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([*_PRELOAD, "torchft"])
    launcher = (os.getpid(), dict(os.environ))
    replicas = {i: _Replica(i) for i in range(dist.world_size)}
    where: dict[str, Any] = {"lighthouse": address, "launcher": os.getpid(), "processes": {}}

    def start(replica: _Replica) -> None:
        replica.start(ctx, (config, run_dir, run_name, replica.id, address), launcher)
        console.say(f"replica {replica.id}: process {replica.proc.pid} started")
        where["processes"][str(replica.id)] = replica.proc.pid
        tmp = run_dir / ".replicas.json.tmp"
        tmp.write_text(json.dumps(where, indent=2) + "\n")
        tmp.replace(run_dir / "replicas.json")  # what runs where, for whoever watches (or kills) a replica

    for replica in replicas.values():
        start(replica)
    finished_at = None
    with _Relay([r.proc for r in replicas.values()]) as relay:
        relay.starting = False
        try:
            while any(r.outcome is None for r in replicas.values()):
                pipes = {pipe: r for r in replicas.values() for pipe in r.pipes}
                for pipe in wait(list(pipes), timeout=0.05):
                    pipes[pipe].read(pipe, console)
                for replica in replicas.values():
                    if replica.outcome is not None or replica.proc.exitcode is None:
                        continue
                    replica.drain(console)
                    kind, value = replica.ending()
                    if kind == "failed":
                        said = f"replica {replica.id}: {'failed: ' if replica.message else ''}{value}"
                        if finished_at is None and not relay.stopped and replica.restarts < dist.max_restarts:
                            replica.restarts += 1
                            console.say(f"{said}; restart {replica.restarts}")
                            start(replica)
                            relay.procs = [r.proc for r in replicas.values()]
                            continue
                        why = (
                            "the others have finished"
                            if finished_at is not None
                            else "a stop signal came"
                            if relay.stopped
                            else f"dist.max_restarts={dist.max_restarts}"
                        )
                        value = f"{value}; not restarted ({why})"
                        console.say(f"{said}; not restarted ({why})")
                    replica.outcome = (kind, value)
                    if kind == "ok" and value["status"] in ("completed", "diverged"):
                        finished_at = finished_at or time.time()
                if finished_at is not None and time.time() - finished_at > _LATE_S:
                    for replica in replicas.values():  # the run is over: a replica still waiting to join has no peers
                        if replica.outcome is None:
                            replica.proc.kill()
                            replica.outcome = ("final", "still joining when the others finished; stopped")
                            console.say(f"replica {replica.id}: {replica.outcome[1]}")
        finally:
            for replica in replicas.values():
                replica.stop(console)
            lighthouse.shutdown()
            console.close()
    return _summarize(run_dir, replicas)


class _Relay(_Forwarding):
    """The stop signals this launcher receives, passed on to the replicas (:class:`~slowmo.comm.spawn._Forwarding`);
    ``stopped`` once one came, after which no replica is restarted."""

    stopped = False

    def _forward(self, signum: int, frame: Any) -> None:
        self.stopped = True
        super()._forward(signum, frame)


class _Replica:
    """A replica's process and the pipes it speaks through: its ending (one message), its output (stdout and stderr,
    line by line) and its progress bar's frames."""

    def __init__(self, replica_id: int) -> None:
        self.id, self.restarts = replica_id, 0
        self.outcome: tuple[str, Any] | None = None  # ("ok", summary), or (how it failed, the error in one line):
        # "failed" (restarted), "final" (not restarted: the run's verdict) or "refused" (its configuration)
        self.proc: Any = None
        self.pipes: list[Connection] = []
        self.message: tuple[str, Any] | None = None

    def start(self, ctx: Any, args: tuple, launcher: tuple) -> None:
        for pipe in self.pipes:  # (those of a process that ended)
            pipe.close()
        ends = [ctx.Pipe(duplex=False) for _ in range(3)]  # ending, output, frames: (reader, writer) each
        self.proc = ctx.Process(
            target=_replica_main, args=(*args, [w for _, w in ends], launcher), name=f"replica_{self.id}"
        )
        self.started_at = time.time()
        self.proc.start()
        for _, writer in ends:
            writer.close()  # (the replica holds them: each reader ends when the replica does)
        self.ending_pipe, self.output, self.frames = (r for r, _ in ends)
        self.pipes, self.message = [r for r, _ in ends], None

    def read(self, pipe: Connection, console: _Console) -> None:
        """What came on ``pipe``, to where it goes."""
        if pipe is self.ending_pipe:
            try:
                self.message = pickle.loads(pipe.recv_bytes())
            except EOFError:
                self.pipes.remove(pipe)
            return
        data = os.read(pipe.fileno(), 1 << 16)
        if not data:
            self.pipes.remove(pipe)
        elif pipe is self.output:
            console.output(self.id, data)
        else:
            console.frame(self.id, data)

    def drain(self, console: _Console, within_s: float = 0.5) -> None:
        """Once the process has ended: what it wrote and has not been read yet (a process of its own that outlives
        it, holding its stderr, is waited for ``within_s`` at most)."""
        deadline = time.time() + within_s
        while self.pipes and (ready := wait(self.pipes, timeout=max(0.0, deadline - time.time()))):
            for pipe in ready:
                self.read(pipe, console)

    def ending(self) -> tuple[str, Any]:
        """How the ended process ended: its message, or how it died without one (a signal, or torchft's exit)."""
        if self.message is not None:
            return self.message
        code = self.proc.exitcode
        return "failed", f"process killed by {signal.Signals(-code).name}" if code < 0 else f"process exited ({code})"

    def report(self, run_dir: Path) -> dict[str, Any] | None:
        """The record of membership this attempt of the replica gave (its summary's ``elastic``): None if it died
        without one."""
        if self.message is not None and self.message[0] == "ok":
            return self.message[1].get("elastic")
        written = replica_dir(run_dir, self.id) / "summary.json"  # (by run_replica, as it failed)
        if self.message is not None and written.exists() and written.stat().st_mtime >= self.started_at:
            return json.loads(written.read_text()).get("elastic")
        return None

    def stop(self, console: _Console) -> None:
        if self.proc.exitcode is None:
            self.proc.kill()
        self.proc.join()
        self.drain(console)


def _summarize(run_dir: Path, replicas: dict[int, _Replica]) -> dict[str, Any]:
    """The run's summary, written to its ``summary.json`` whatever the ending, with the ``metrics.jsonl`` (and
    ``final.pt``) of a replica that stayed beside it: that of the first replica that finished without a restart (else
    the first that finished; else replica 0, and the run failed). A run whose replicas all failed raises
    :class:`~slowmo.comm.CommError` after that (with the first replica's error); one refused for its configuration
    writes nothing and raises :class:`~slowmo.registry.ConfigError`."""
    outcomes = {i: r.outcome for i, r in sorted(replicas.items())}
    done = {i: value for i, (kind, value) in outcomes.items() if kind == "ok"}
    errors = {i: value for i, (kind, value) in outcomes.items() if kind != "ok"}
    refused = [value for kind, value in outcomes.values() if kind == "refused"]
    if not done and refused:
        raise ConfigError(refused[0])
    primary = next((i for i in done if not replicas[i].restarts), next(iter(done), 0))
    summary = dict(done[primary]) if done else {"status": "failed", "error": errors[min(errors)]}
    own = replica_dir(run_dir, primary)
    for name in ("metrics.jsonl", "final.pt"):
        if (own / name).exists():
            shutil.copyfile(own / name, run_dir / name)
    records = {i: _records(replica_dir(run_dir, i)) for i in replicas}
    votes = [r for r in records[primary] if "participants" in r]  # (as logged: a vote right before a failure is not)
    reported = replicas[primary].report(run_dir) or {  # its own votes; those it logged, if it died without a word
        "participants": [r["participants"] for r in votes],
        "failed_commits": sum(not r["committed"] for r in votes),
    }
    summary["elastic"] = {
        "participants": reported["participants"],
        "failed_commits": reported["failed_commits"],
        "heals": sum(r.get("healed", False) for rs in records.values() for r in rs),
        "restarts": sum(r.restarts for r in replicas.values()),
        "membership_s": reported.get("membership_s"),
        "replicas": {
            str(i): {
                "status": done[i]["status"] if i in done else "failed",
                "restarts": replicas[i].restarts,
                "heals": sum(r.get("healed", False) for r in records[i]),
                **({} if i in done else {"error": errors[i]}),
            }
            for i in replicas
        },
    }
    summary.update(run_dir=str(run_dir), rank=0, replica=primary)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not done:
        raise CommError(summary["error"])
    return summary


def _records(replica: Path) -> list[dict[str, Any]]:
    path = replica / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


# ------------------------------------------------------------------------------------------------ a replica process
def _replica_main(config, run_dir, run_name, replica_id, lighthouse, pipes, launcher) -> None:
    """One replica process: its own process group (the launcher passes signals on), dies with the launcher, writes
    into the launcher's pipes (its ending, everything it prints, its progress bar), listens on the loopback address."""
    ending, output, frames = pipes
    os.setpgrp()
    pid, environ = launcher
    _die_with(pid)
    os.environ.clear()
    os.environ.update(environ)
    os.environ.setdefault("RUST_LOG", "warn")
    for fd in (1, 2):  # (C++ and Rust write there too)
        os.dup2(output.fileno(), fd)
    output.close()
    if config.logger.progress:
        sys.stderr = _Frames(sys.stderr, frames)
    else:
        frames.close()
    tqdm.set_lock(threading.RLock())  # (its default, a multiprocessing lock, is a semaphore a killed replica leaks)
    import torch

    torch.set_num_threads(threads_per_rank(local_world_size=config.dist.world_size))
    try:
        message = ("ok", run_replica(config, run_dir, run_name, replica_id, lighthouse, host=elastic.LOOPBACK))
    except BaseException as error:  # noqa: BLE001 - reported to the launcher
        if not isinstance(error, _TOLD):
            traceback.print_exc()  # whole, through the launcher, each line naming this replica
        kind = "refused" if isinstance(error, _REFUSED) else "final" if isinstance(error, _FINAL) else "failed"
        message = (kind, _one_line(error))
    sys.stdout.flush()
    sys.stderr.flush()
    ending.send_bytes(pickle.dumps(message))


class _Frames:
    """A replica process's ``sys.stderr`` while its progress bar is on: the bar's frames (tqdm writes each as one
    string that starts with a carriage return) go to their own pipe, everything else to stderr, so that the launcher
    draws the bar apart from the lines."""

    encoding = "utf-8"

    def __init__(self, stderr: TextIO, frames: Connection) -> None:
        self.stderr, self.frames = stderr, frames

    def write(self, text: str) -> int:
        if text.startswith("\r"):
            os.write(self.frames.fileno(), text.encode())
        else:
            self.stderr.write(text)
        return len(text)

    def flush(self) -> None:
        self.stderr.flush()

    def fileno(self) -> int:
        return self.stderr.fileno()

    def isatty(self) -> bool:
        return False


class _Console:
    """Where a local elastic run's replicas speak. Every line a replica writes comes out whole and names its replica
    (``replica 1: ...``, added where the line does not start so); in a terminal, each replica's progress bar is drawn
    on a line of its own below the lines, and redrawn there (a log file gets the lines only)."""

    def __init__(self, stream: TextIO, bars: bool) -> None:
        self.stream, self.bars = stream, bars
        self.frames: dict[int, str] = {}
        self.drawn = 0  # lines of bars now under the cursor
        self.decoders: dict[int, Any] = {}
        self.partial: dict[int, str] = {}

    def say(self, line: str) -> None:
        """One line, above the bars."""
        self._erase()
        self.stream.write(line + "\n")
        self._draw()

    def output(self, replica: int, data: bytes) -> None:
        """What replica ``replica`` printed: every complete line, naming the replica (blank lines dropped)."""
        decoder = self.decoders.setdefault(replica, codecs.getincrementaldecoder("utf-8")(errors="replace"))
        *lines, self.partial[replica] = (self.partial.get(replica, "") + decoder.decode(data)).split("\n")
        for line in filter(str.strip, lines):
            self.say(line if re.match(rf"replica {replica}\b", line) else f"replica {replica}: {line}")

    def frame(self, replica: int, data: bytes) -> None:
        """The newest frame of replica ``replica``'s progress bar."""
        newest = data.decode(errors="replace").rsplit("\r", 1)[-1].rstrip()
        if newest:
            self.frames[replica] = newest
            self._erase()
            self._draw()

    def close(self) -> None:
        for replica, rest in self.partial.items():  # a last line without its newline
            if rest.strip():
                self.say(f"replica {replica}: {rest}")
        self.partial.clear()

    def _draw(self) -> None:
        if self.bars and self.frames:
            width = shutil.get_terminal_size().columns - 1
            self.stream.write("".join(self.frames[i][:width] + "\n" for i in sorted(self.frames)))
            self.drawn = len(self.frames)
        self.stream.flush()

    def _erase(self) -> None:
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}A\r\x1b[J")  # up to the first bar's line, then clear to the end
            self.drawn = 0
