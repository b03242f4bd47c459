"""An elastic run (``dist=torchft``): replicas that leave and join while the others train on.

:func:`run_replica` is one replica: the training loop of :mod:`.loop` over an :class:`~slowmo.comm.elastic.Elastic`
communicator, in the run directory's ``replica_<i>/`` (its own config, metrics, checkpoints and summary). On a cluster
each replica is a job of its own (``dist.replica_id``, ``dist.lighthouse``).

:func:`run_local` starts a lighthouse and ``dist.world_size`` replica processes on this machine, restarts a replica
process that dies (up to ``dist.max_restarts`` times each; it heals from a live peer as it rejoins), passes stop
signals on, and writes the run's own ``summary.json`` (the ``elastic`` section: the participants of every outer step,
the failed commits, the heals and the restarts), ``metrics.jsonl`` and ``final.pt`` (those of a replica that stayed);
``replicas.json`` says, while it runs, the lighthouse's address and each replica's process id.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from omegaconf import OmegaConf

from ..comm import CommError, elastic
from ..comm.launch import threads_per_rank
from ..comm.spawn import _PRELOAD, _die_with, _Forwarding
from .config import Config, to_dict
from .loop import train_rank

_LATE_S = 5.0  # once a replica has finished, how long the others may take to finish before they are stopped


def replica_dir(run_dir: Path, replica_id: int) -> Path:
    return run_dir / f"replica_{replica_id}"


def run_replica(config: Config, run_dir: Path, run_name: str | None, replica_id: int, lighthouse: str) -> dict:
    """Replica ``replica_id`` of the run in ``run_dir``; returns its summary."""
    own = replica_dir(run_dir, replica_id)
    train = dataclasses.replace(config.train, overwrite=False)  # (the launcher discarded the run; a restart resumes)
    config = dataclasses.replace(config, run_dir=str(own), train=train)
    dist = config.dist
    comm = elastic.Elastic(
        replica_id, dist.world_size, lighthouse, dist.min_replicas, dist.quorum_timeout_s, dist.timeout_s
    )
    try:
        return train_rank(comm, config, own, run_name)
    finally:
        comm.close()


def run_local(config: Config, run_dir: Path, run_name: str | None) -> dict[str, Any]:
    """A lighthouse and ``dist.world_size`` replica processes here; returns the run's summary."""
    dist = config.dist
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(to_dict(config)))
    lighthouse = elastic.start_lighthouse(dist.min_replicas, dist.join_timeout_s, dist.heartbeat_timeout_s)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([*_PRELOAD, "torchft"])
    queue = ctx.SimpleQueue()
    launcher = (os.getpid(), dict(os.environ))
    restarts = dict.fromkeys(range(dist.world_size), 0)
    outcomes: dict[int, tuple[bool, Any]] = {}

    processes: dict[str, int] = {}

    def start(i: int) -> Any:
        args = (config, run_dir, run_name, i, lighthouse.address(), queue, launcher)
        proc = ctx.Process(target=_replica_main, args=args, name=f"replica_{i}")
        proc.start()
        print(f"replica {i}: process {proc.pid} started", file=sys.stderr, flush=True)
        processes[str(i)] = proc.pid
        where = {"lighthouse": lighthouse.address(), "processes": processes}
        tmp = run_dir / ".replicas.json.tmp"
        tmp.write_text(json.dumps(where, indent=2) + "\n")
        tmp.replace(run_dir / "replicas.json")  # what runs where, for whoever watches (or kills) a replica
        return proc

    procs = {i: start(i) for i in range(dist.world_size)}
    finished_at = None
    with _Forwarding(list(procs.values())) as forwarding:
        forwarding.starting = False
        try:
            while len(outcomes) < len(procs):
                while not queue.empty():
                    i, ok, payload = queue.get()
                    outcomes[i] = (ok, pickle.loads(payload) if ok else payload)
                    finished_at = finished_at or (time.time() if ok else None)
                for i, proc in procs.items():
                    if i in outcomes or proc.exitcode is None or not queue.empty():
                        continue
                    if finished_at is None and restarts[i] < dist.max_restarts:  # died without a word: killed
                        restarts[i] += 1
                        print(f"replica {i}: process died ({proc.exitcode}); restart {restarts[i]}", file=sys.stderr)
                        procs[i] = start(i)
                        forwarding.procs = list(procs.values())
                    else:
                        outcomes[i] = (False, f"process died ({proc.exitcode}), not restarted")
                if finished_at is not None and time.time() - finished_at > _LATE_S:
                    for i, proc in procs.items():  # the run is over: a replica still waiting to join has no peers
                        if i not in outcomes and proc.exitcode is None:
                            proc.kill()
                            outcomes[i] = (False, "still joining when the others finished; stopped")
                time.sleep(0.02)
        finally:
            for proc in procs.values():
                if proc.exitcode is None:
                    proc.kill()
                proc.join()
            lighthouse.shutdown()
    return _summarize(run_dir, outcomes, restarts)


def _summarize(run_dir: Path, outcomes: dict[int, tuple[bool, Any]], restarts: dict[int, int]) -> dict[str, Any]:
    """The run's summary from its replicas': that of the first replica that finished without a restart (else the
    first that finished), with the elastic section over all of them; its metrics and final model beside it."""
    done = {i: value for i, (ok, value) in sorted(outcomes.items()) if ok}
    if not done:
        first = next(iter(sorted(outcomes.items())))[1][1]
        raise CommError(str(first).strip().splitlines()[-1] if first else "every replica failed")
    primary = next((i for i in done if not restarts[i]), next(iter(done)))
    summary = dict(done[primary])
    if summary.get("status") == "completed":
        for name in ("metrics.jsonl", "final.pt"):
            if (replica_dir(run_dir, primary) / name).exists():
                shutil.copyfile(replica_dir(run_dir, primary) / name, run_dir / name)
    own = summary.get("elastic", {"participants": [], "failed_commits": 0, "heals": 0})
    summary["elastic"] = {
        **own,
        "heals": sum(s.get("elastic", {}).get("heals", 0) for s in done.values()),
        "restarts": sum(restarts.values()),
        "replicas": {
            str(i): {
                "status": done[i].get("status") if i in done else "failed",
                "restarts": restarts[i],
                "heals": done[i].get("elastic", {}).get("heals", 0) if i in done else None,
                **({} if i in done else {"error": str(outcomes[i][1]).strip().splitlines()[-1]}),
            }
            for i in sorted(outcomes)
        },
    }
    summary.update(run_dir=str(run_dir), rank=0, replica=primary)
    if summary.get("status") == "completed":
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _replica_main(config, run_dir, run_name, replica_id, lighthouse, queue, launcher) -> None:
    """One replica process: its own process group (the launcher passes signals on), dies with the launcher, reports
    its summary or its error."""
    os.setpgrp()
    pid, environ = launcher
    _die_with(pid)
    os.environ.clear()
    os.environ.update(environ)
    os.environ.setdefault("RUST_LOG", "warn")
    import torch

    torch.set_num_threads(threads_per_rank(local_world_size=config.dist.world_size))
    try:
        summary = run_replica(config, run_dir, run_name, replica_id, lighthouse)
        queue.put((replica_id, True, pickle.dumps(summary)))
    except BaseException as error:  # noqa: BLE001 - reported to the launcher
        text = str(error) if isinstance(error, CommError) else traceback.format_exc()
        queue.put((replica_id, False, text))
