"""The cost of elasticity (dist=torchft).

What the quorum and the vote of every outer step cost a healthy run, and how long a run takes to commit again after a
replica is killed.

1. Throughput. The same run (MNIST-1D's 1-D CNN, Local SGD under SlowMo, tau = 12, batch 32, 3 ranks) on dist=gloo
   (3 processes, a fixed group) and on dist=torchft (3 replica processes and a lighthouse: a quorum, a vote and a
   participants' all-reduce per outer step), in alternation, ``--repeats`` times each: inner steps per second of
   training (the run's own wall time, start-up excluded), the time each outer step adds, (1/elastic - 1/gloo) x
   tau, and the time a replica spends per outer step in the vote and the next quorum (waits for its peers
   included). The ratio is the median of the pairs' ratios. Under dist=torchft the loop's own agreements (the
   logged loss, stop signals, evaluation) stay inside each replica, where gloo's ranks agree on them every
   ``logger.log_every`` steps.
2. Recovery. dist=torchft with min_replicas = 2: replica 1 killed with -9 right after its 3rd outer step; the time
   from the kill to the survivors' next committed outer step (they discard the round in flight and go on as two once
   the lighthouse has given the dead replica up, ``dist.heartbeat_timeout_s`` = 2 s), and to the step where the
   restarted replica, healed from a live peer, takes part again.

Writes ``results/elastic/``: ``throughput.csv``, ``recovery.csv`` and their ``README.md``.
Run: ``python benchmarks/elastic.py`` (about 4 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from slowmo.cells import ENTRYPOINTS

from common import config, read
from readme import record

ROOT = Path(__file__).resolve().parents[1]
COMMON = read("elastic")["base"].split()  # configs/benchmark/elastic.yaml
TAU = config(COMMON).slowmo.tau
SCRIPT = ENTRYPOINTS / config(COMMON).task.name / "train.py"
ENV = {**os.environ, "RUST_LOG": "warn", "PYTHONWARNINGS": "ignore"}


def _train(run_dir: Path, *overrides: str, kill_after: int | None = None) -> tuple[dict, float | None]:
    """One run of the task's experiments/<task>/train.py; with ``kill_after``, replica 1 is killed with -9 right
    after its ``kill_after``-th outer step (returns the time of the kill)."""
    command = [sys.executable, str(SCRIPT), *COMMON, *overrides, f"run_dir={run_dir}"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    pids: dict[int, int] = {}
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            started = re.match(r"replica (\d+): process (\d+) started", line)
            if started:
                pids[int(started.group(1))] = int(started.group(2))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed = None
    while proc.poll() is None:
        if kill_after is not None and killed is None and len(_rounds(run_dir / "replica_1")) >= kill_after:
            os.kill(pids[1], signal.SIGKILL)
            killed = time.time()
        time.sleep(0.005)
    reader.join(timeout=5)
    if proc.returncode:
        raise SystemExit(f"a run failed:\n{''.join(lines)[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text()), killed


def _rounds(replica: Path) -> list[dict]:
    path = replica / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []
    return [r for r in records if "participants" in r]


def throughput(out: Path, steps: int, repeats: int) -> list[dict]:
    rates: dict[str, list[float]] = {"gloo": [], "torchft": []}
    membership: list[float] = []  # s per outer step in the vote and the next quorum
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            for backend in rates:
                extra = ["dist.min_replicas=3"] if backend == "torchft" else []
                summary, _ = _train(
                    Path(tmp) / f"{backend}{repeat}", f"dist={backend}", f"train.max_steps={steps}", *extra
                )
                rates[backend].append(summary["steps"] / summary["wall_time"])
                if backend == "torchft":
                    membership.append(summary["elastic"]["membership_s"] / (summary["steps"] // TAU))
                print(f"{backend} #{repeat}: {rates[backend][-1]:.1f} steps/s", flush=True)
    ratios = [e / g for e, g in zip(rates["torchft"], rates["gloo"], strict=True)]
    gloo, elastic = statistics.median(rates["gloo"]), statistics.median(rates["torchft"])
    rows = [
        {
            "backend": backend,
            "steps_per_s": f"{statistics.median(values):.1f}",
            "runs": len(values),
            "ratio_to_gloo": f"{statistics.median(ratios):.3f}" if backend == "torchft" else "1.000",
            "ms_per_outer_step_added": f"{(1 / elastic - 1 / gloo) * TAU * 1000:.1f}" if backend == "torchft" else "",
            "ms_per_outer_step_in_vote_and_quorum": f"{statistics.median(membership) * 1000:.1f}"
            if backend == "torchft"
            else "",
        }
        for backend, values in rates.items()
    ]
    _write(out / "throughput.csv", rows)
    return rows


def recovery(out: Path, steps: int, repeats: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats):
            run_dir = Path(tmp) / f"kill{repeat}"
            overrides = ("dist=torchft", "dist.min_replicas=2", "dist.max_restarts=1", f"train.max_steps={steps}")
            summary, killed = _train(run_dir, *overrides, kill_after=3)
            survivor = _rounds(run_dir / "replica_0")
            after = [r for r in survivor if r["time"] > killed]
            committed = next(r for r in after if r["committed"])
            back = next((r for r in after if r["committed"] and 1 in r["participants"]), None)
            rows.append(
                {
                    "run": repeat,
                    "kill_to_next_commit_s": f"{committed['time'] - killed:.2f}",
                    "rounds_discarded": sum(not r["committed"] for r in after),
                    "kill_to_rejoined_s": f"{back['time'] - killed:.2f}" if back else "not before the end",
                    "rounds_without_it": sum(r["committed"] and 1 not in r["participants"] for r in after),
                    "heals": summary["elastic"]["heals"],
                }
            )
            print(rows[-1], flush=True)
    _write(out / "recovery.csv", rows)
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1200, help="inner steps per run (a multiple of tau = 12)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "elastic")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    throughput(args.out, args.steps, args.repeats)
    recovery(args.out, args.steps, args.repeats)
    record(args.out, __file__, None)


if __name__ == "__main__":
    main()
