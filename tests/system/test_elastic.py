"""dist=torchft, with the real torchft package, real processes and a real lighthouse on 127.0.0.1: a healthy 3-replica
run equals the simulated 3-rank run; a replica killed with -9 is restarted and heals from a live peer while the others
train on, and every replica ends bit-identical; a replica that leaves for good and one that joins late; too few
replicas stop in one line with no process left; a whole-job kill resumes from the file checkpoints bit-exactly. What a
run exposes and keeps: no listener of its processes outside the loopback address, a replica killed from the
lighthouse's dashboard restarted; a diverged run's record; a stop signal during a quorum wait acted on within seconds;
its console, in a log file and in a terminal.

The digits task, Local SGD under SlowMo (tau = 12, beta = 0.6), 3 replicas, 96 inner steps (8 outer steps): a run
takes 8-14 s here, mostly the replica processes' start.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from command_line import ROOT

os.environ.setdefault("RUST_LOG", "warn")  # (torchft reads it once, as it loads)
pytest.importorskip("torchft", reason="torchft is not installed here (make test installs it: pip install '.[elastic]')")

from slowmo.comm import CommError  # noqa: E402
from slowmo.registry import ConfigError  # noqa: E402
from slowmo.train import checkpoint, compose, run, validate  # noqa: E402

TAU, STEPS = 12, 96
COMMON = [
    "slowmo=on",
    f"slowmo.tau={TAU}",
    "slowmo.update.beta=0.6",
    f"train.max_steps={STEPS}",
    "train.eval_every=0",
    f"logger.log_every={TAU}",
    "logger.progress=false",
    "data.batch_size=16",
]
ELASTIC = ["dist=torchft", "dist.world_size=3", "dist.min_replicas=2", "dist.timeout_s=15", "dist.quorum_timeout_s=30"]
PLAIN_SGD = ["optimizer.momentum=0", "optimizer.nesterov=false"]
ENV = {**os.environ, "RUST_LOG": "warn", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "final.pt", weights_only=True)["model"]


def _rounds(replica: Path) -> list[dict]:
    lines = (replica / "metrics.jsonl").read_text().splitlines() if (replica / "metrics.jsonl").exists() else []
    return [r for r in map(json.loads, lines) if "participants" in r]


def _checkpoint(replica: Path, step: int) -> dict:
    return checkpoint.load_rank(replica / "checkpoints" / f"step_{step}", 0)


def _same(a, b) -> bool:
    """Bit-identical nested states (tensors compared with torch.equal)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


class Job:
    """``experiments/digits/train.py`` in a subprocess: its stderr read as it comes, the replicas' pids from it."""

    def __init__(self, *args: str, stderr: int = subprocess.PIPE) -> None:
        command = [sys.executable, str(ROOT / "experiments/digits/train.py"), *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=ENV)
        self.lines: list[str] = []
        self.pids: dict[int, int] = {}
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr or ():
            self.lines.append(line)
            started = re.match(r"replica (\d+): process (\d+) started", line)
            if started:
                self.pids[int(started.group(1))] = int(started.group(2))

    def until(self, condition, timeout: float = 90.0) -> None:
        deadline = time.time() + timeout
        while not condition():
            assert self.proc.poll() is None, "".join(self.lines)[-3000:]
            assert time.time() < deadline, "".join(self.lines)[-3000:]
            time.sleep(0.02)

    def wait(self, timeout: float = 120.0) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=5)
        return code

    @property
    def stderr(self) -> str:
        return "".join(self.lines)


class Launch:
    """``slowmo.train.run`` of an elastic run, in a thread of this process (its replica processes come from the fork
    server, warm after the first run); the replicas' process ids from the run's ``replicas.json``."""

    def __init__(self, run_dir: Path, *overrides: str) -> None:
        self.run_dir, self.summary, self.error = run_dir, None, None
        config = validate(compose([*overrides, f"run_dir={run_dir}"]))
        self.thread = threading.Thread(target=self._run, args=(config,), daemon=True)
        self.thread.start()

    def _run(self, config) -> None:
        try:
            self.summary = run(config)
        except BaseException as error:  # noqa: BLE001 - the test looks at it
            self.error = error

    def where(self) -> dict:
        """The run's replicas.json: the lighthouse's address, the launcher's process id and the replicas'."""
        try:
            return json.loads((self.run_dir / "replicas.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"processes": {}}

    def pids(self) -> dict[int, int]:
        return {int(i): pid for i, pid in self.where()["processes"].items()}

    def until(self, condition, timeout: float = 90.0) -> None:
        deadline = time.time() + timeout
        while not condition():
            assert self.thread.is_alive(), f"the run ended early: {self.error!r}"
            assert time.time() < deadline
            time.sleep(0.02)

    def wait(self, timeout: float = 120.0) -> Launch:
        self.thread.join(timeout)
        assert not self.thread.is_alive()
        return self


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.fixture(scope="module")
def healthy(tmp_path_factory) -> Path:
    """A healthy elastic run, the reference of two tests; plain SGD as the base, so that a replica that heals from a
    peer (which brings the peer's base optimizer state) computes what it would have computed on its own. Every round
    has all three replicas (min_replicas=3: one that starts late is waited for, not left out)."""
    run_dir = tmp_path_factory.mktemp("elastic") / "healthy"
    launch = Launch(run_dir, *COMMON, *ELASTIC, *PLAIN_SGD, "dist.min_replicas=3", "train.checkpoint_every=0").wait()
    assert launch.error is None
    return run_dir


def test_a_healthy_elastic_run_equals_the_simulated_one(healthy: Path, tmp_path: Path) -> None:
    summary = json.loads((healthy / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    elastic = summary["elastic"]
    assert elastic["participants"] == [[0, 1, 2]] * (STEPS // TAU)
    assert (elastic["failed_commits"], elastic["heals"], elastic["restarts"]) == (0, 0, 0)
    simulated = run(
        validate(compose([*COMMON, *PLAIN_SGD, "dist=simulated", "dist.world_size=3", f"run_dir={tmp_path}"]))
    )
    assert simulated["status"] == "completed"
    mine, theirs = _final(healthy), _final(tmp_path)
    for name, tensor in theirs.items():  # the same sums, in gloo's order rather than the simulator's
        torch.testing.assert_close(mine[name], tensor, rtol=1e-5, atol=1e-6)
    replicas = [_final(healthy / f"replica_{i}") for i in range(3)]
    assert all(_same(r, replicas[0]) for r in replicas)  # every replica holds x_T,0
    # bytes: the ring formula with n = 3 for the parameters, once per outer step and once at the start (x_0,0)
    numel = sum(t.numel() for name, t in mine.items() if t.is_floating_point())
    per_average = 2 * (3 - 1) * numel * 4 // 3
    by_kind = summary["comm_bytes_by_kind"]
    assert by_kind["all_reduce"] == per_average * (STEPS // TAU)
    assert by_kind["broadcast"] == per_average


def test_kill_9_of_a_replica_restarts_it_and_heals_it_from_a_live_peer(tmp_path: Path) -> None:
    checkpoints = [f"train.checkpoint_every={TAU}", "train.keep_checkpoints=0"]
    # min_replicas=3: the survivors wait for the restarted replica (it must heal before the run ends)
    launch = Launch(tmp_path, *COMMON, *ELASTIC, "dist.min_replicas=3", *checkpoints)
    launch.until(lambda: len(_rounds(tmp_path / "replica_1")) >= 2)
    os.kill(launch.pids()[1], signal.SIGKILL)
    assert launch.wait().error is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    elastic = summary["elastic"]
    assert summary["status"] == "completed" and elastic["restarts"] == 1 and elastic["heals"] >= 1
    assert elastic["replicas"]["1"] == {"status": "completed", "restarts": 1, "heals": 1}
    # the survivors record the same failed commits (the round the kill fell in; none if it fell between two rounds,
    # where the next quorum waits for the restarted replica), and the run's summary counts them
    failed = {i: [r["step"] for r in _rounds(tmp_path / f"replica_{i}") if not r["committed"]] for i in (0, 2)}
    assert failed[0] == failed[2] and elastic["failed_commits"] == len(failed[0]) <= 1
    assert all(r["participants"] == [0, 1, 2] for r in _rounds(tmp_path / "replica_0") if r["committed"])
    # the heal: replica 1's state at the heal equals, bit for bit, the checkpoint one survivor wrote at that step
    heal = next(
        r["step"]
        for r in map(json.loads, (tmp_path / "replica_1/metrics.jsonl").read_text().splitlines())
        if r.get("healed")
    )
    received = _checkpoint(tmp_path / "replica_1", heal)
    keys = ("model", "optimizer", "step", "epoch", "position")
    sources = [_checkpoint(tmp_path / f"replica_{i}", heal) for i in (0, 2)]
    assert any(all(_same(received[k], source[k]) for k in keys) for source in sources)
    assert received["optimizer"]["outer"]["t"] == heal // TAU - len(failed[0])  # a discarded round is no outer step
    # the end: every replica holds the same parameters and outer state (x_T,0, u, t), bit for bit
    finals = [_checkpoint(tmp_path / f"replica_{i}", STEPS) for i in range(3)]
    for other in finals[1:]:
        assert _same(other["model"], finals[0]["model"])
        assert _same(other["optimizer"]["outer"], finals[0]["optimizer"]["outer"])
    assert all(_same(_final(tmp_path / f"replica_{i}"), _final(tmp_path)) for i in range(3))


def test_a_replica_that_leaves_for_good(tmp_path: Path) -> None:
    launch = Launch(tmp_path, *COMMON, *ELASTIC, "dist.max_restarts=0", "train.checkpoint_every=0")
    launch.until(lambda: len(_rounds(tmp_path / "replica_2")) >= 2)
    os.kill(launch.pids()[2], signal.SIGKILL)
    assert launch.wait().error is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["elastic"]["replicas"]["2"]["status"] == "failed"
    committed = [r["participants"] for r in _rounds(tmp_path / "replica_0") if r["committed"]]
    last_of_three = max(i for i, participants in enumerate(committed) if participants == [0, 1, 2])
    after = committed[last_of_three + 1 :]
    assert after and all(participants == [0, 1] for participants in after)  # 3, then 2 for good
    assert _same(_final(tmp_path / "replica_0"), _final(tmp_path / "replica_1"))


def _lighthouse(min_replicas: int) -> tuple[subprocess.Popen, str]:
    """torchft's lighthouse binary; replicas that stop heartbeating stay members for a minute."""
    from slowmo.comm import free_port

    port = free_port()
    binary = Path(sys.executable).parent / "torchft_lighthouse"
    args = ["--min_replicas", str(min_replicas), "--join_timeout_ms", "1000", "--quorum_tick_ms", "20"]
    args += ["--heartbeat_timeout_ms", "60000"]
    proc = subprocess.Popen([str(binary), *args, "--bind", f"[::]:{port}"], env=ENV, stderr=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def test_a_late_joiner_on_a_cluster_style_launch(tmp_path: Path) -> None:
    """One process per replica (dist.replica_id), as one job per replica on SLURM, and a lighthouse of their own. The
    first two are paused (SIGSTOP) while the third starts, so that it comes while they still have rounds to go."""
    lighthouse, address = _lighthouse(min_replicas=2)
    try:
        replica = [*COMMON, *ELASTIC, "train.checkpoint_every=0", f"run_dir={tmp_path}", f"dist.lighthouse={address}"]
        early = [Job(*replica, f"dist.replica_id={i}") for i in (0, 1)]
        early[0].until(lambda: len(_rounds(tmp_path / "replica_0")) >= 2)
        for job in early:
            os.kill(job.proc.pid, signal.SIGSTOP)
        late = Job(*replica, "dist.replica_id=2")
        late.until(lambda: (tmp_path / "replica_2/config.yaml").exists())  # (written just before it asks to join)
        for job in early:
            os.kill(job.proc.pid, signal.SIGCONT)
        for job in (*early, late):
            assert job.wait() == 0, job.stderr
    finally:
        lighthouse.kill()
        lighthouse.wait()
    participants = [r["participants"] for r in _rounds(tmp_path / "replica_0")]
    assert participants[:2] == [[0, 1]] * 2 and participants[-1] == [0, 1, 2]
    assert all(r["committed"] for r in _rounds(tmp_path / "replica_0"))
    assert "healed from a peer" in late.stderr
    finals = [_final(tmp_path / f"replica_{i}") for i in range(3)]
    assert all(_same(f, finals[0]) for f in finals)


def test_fewer_than_min_replicas_stop_in_one_line_with_no_process_left(tmp_path: Path) -> None:
    overrides = [*ELASTIC, "dist.min_replicas=3", "dist.quorum_timeout_s=3", "dist.max_restarts=0"]
    launch = Launch(tmp_path, *COMMON, *overrides, "train.checkpoint_every=0")
    launch.until(lambda: len(_rounds(tmp_path / "replica_0")) >= 1)
    pids = launch.pids()
    os.kill(pids[2], signal.SIGKILL)
    start = time.time()
    launch.wait(timeout=60)
    assert time.time() - start < 30
    assert isinstance(launch.error, CommError) and "\n" not in str(launch.error)
    assert re.fullmatch(
        r"replica [01]: fewer than dist.min_replicas=3 replicas for dist.quorum_timeout_s=3 s; start more "
        r"replicas or lower dist.min_replicas \(during step \d+\)",
        str(launch.error),
    )
    time.sleep(0.5)
    assert not [pid for pid in pids.values() if _alive(pid)]
    summary = json.loads((tmp_path / "summary.json").read_text())  # a failed run keeps its record too
    assert (summary["status"], summary["error"]) == ("failed", str(launch.error))
    assert summary["elastic"]["replicas"]["2"]["status"] == "failed" and (tmp_path / "metrics.jsonl").exists()
    # the rounds voted down: those logged, and the one the failure cut short (if the kill fell inside a round)
    logged = sum(not r["committed"] for r in _rounds(tmp_path / "replica_0"))
    assert summary["elastic"]["failed_commits"] in (logged, logged + 1)


def test_a_whole_job_killed_resumes_from_the_file_checkpoints(healthy: Path, tmp_path: Path) -> None:
    overrides = [*COMMON, *ELASTIC, *PLAIN_SGD, "dist.min_replicas=3", f"train.checkpoint_every={TAU}"]
    overrides.append(f"run_dir={tmp_path}")
    job = Job(*overrides)
    job.until(lambda: (tmp_path / "replica_2/checkpoints/step_36").exists())
    job.proc.kill()  # the launcher, killed with -9: its replicas die with it
    job.wait()
    time.sleep(0.5)
    assert not [pid for pid in job.pids.values() if _alive(pid)]
    again = Job(*overrides)
    assert again.wait() == 0, again.stderr
    assert re.search(r"replica \d: resuming at step \d+ from", again.stderr)
    assert _same(_final(tmp_path), _final(healthy))  # as if never stopped
    resumed, straight = (json.loads((d / "summary.json").read_text()) for d in (tmp_path, healthy))
    assert resumed["comm_bytes_by_kind"] == straight["comm_bytes_by_kind"]  # its counters too


# ------------------------------------------------------------------------------------------------ what a run exposes
def _listening(pid: int) -> list[str]:
    """The addresses process ``pid`` accepts TCP connections on (IPv4 and IPv6), from /proc: its open sockets that the
    kernel's tables show in state LISTEN."""
    sockets = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # (closed meanwhile)
            continue
        if target.startswith("socket:["):
            sockets.add(target[len("socket:[") : -1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in sockets:  # 0A: LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])  # 32-bit words, each in the host's (little-endian) order
                found.append(socket.inet_ntop(family, b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))))
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def _kill_from_the_dashboard(lighthouse: str, replica: int) -> None:
    """What the dashboard's Kill button does: a POST to the lighthouse, which has the replica's manager end it."""
    page = urllib.request.urlopen(f"{lighthouse}/status", timeout=10).read().decode()
    url = next(u for u in re.findall(r'hx-post="([^"]+)"', page) if u.startswith(f"/replica/replica_{replica}:"))
    try:
        urllib.request.urlopen(urllib.request.Request(lighthouse + url, method="POST"), timeout=10)
    except urllib.error.HTTPError:
        pass  # (the replica's manager ends it before it answers)


def test_no_listener_beyond_loopback_and_a_replica_killed_from_the_dashboard_comes_back(tmp_path: Path) -> None:
    """Every listening socket of the launcher (the lighthouse) and of the replicas (store, manager, process group) is
    on the loopback address; the dashboard's kill, which anyone who reaches the lighthouse can send, ends replica 1
    (torchft's manager exits the process; what the replica's threads say meanwhile is a failure of its own), which is
    restarted, heals from a live peer, and the run completes."""
    launch = Launch(
        tmp_path, *COMMON, *ELASTIC, "dist.min_replicas=3", "train.max_steps=240", f"train.checkpoint_every={TAU}"
    )
    launch.until(lambda: all(len(_rounds(tmp_path / f"replica_{i}")) >= 2 for i in range(3)))
    where = launch.where()
    replicas = list(where["processes"].values())
    listening = {pid: _listening(pid) for pid in (where["launcher"], *replicas)}
    assert where["launcher"] == os.getpid() and where["lighthouse"].startswith("http://127.0.0.1:")
    assert listening[where["launcher"]] and all(len(listening[pid]) >= 3 for pid in replicas)
    outside = {pid: [a for a in addresses if not _loopback(a)] for pid, addresses in listening.items()}
    assert not any(outside.values()), outside
    _kill_from_the_dashboard(where["lighthouse"], 1)
    assert launch.wait().error is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 240
    assert summary["elastic"]["replicas"]["1"] == {"status": "completed", "restarts": 1, "heals": 1}
    logged = sum(not r["committed"] for r in _rounds(tmp_path / f"replica_{summary['replica']}"))
    assert summary["elastic"]["failed_commits"] == logged <= 1  # (the round the kill fell in, if it fell in one)


def test_a_configuration_error_in_the_replicas_is_told_once_and_not_restarted(tmp_path: Path, capfd) -> None:
    """A batch larger than a replica's shard, found as the replicas build their data: refused, not restarted (it
    would fail again), and the run directory gets no summary."""
    launch = Launch(tmp_path, *COMMON, *ELASTIC, "data.batch_size=4096", "train.checkpoint_every=0").wait()
    assert isinstance(launch.error, ConfigError) and "\n" not in str(launch.error)
    assert "no full batch" in str(launch.error)
    assert "restart" not in capfd.readouterr().err
    assert not (tmp_path / "summary.json").exists()


# ------------------------------------------------------------------------------------------------ every ending kept
def test_a_diverged_elastic_run_keeps_its_record(tmp_path: Path, capfd) -> None:
    """An outer step twice as long as SlowMo's (alpha = 2, beta = 0.9): the train loss halves, then climbs back above
    its start (near step 120); replica 1 is killed with -9 on the way (restarted, healed). The run's summary.json says
    diverged, with its restarts, heals and failed commits, its metrics.jsonl and final.pt beside it; the warnings name
    their replica."""
    overrides = ["optimizer.lr=0.05", "slowmo.update.alpha=2.0", "slowmo.update.beta=0.9", "train.max_steps=192"]
    overrides += ["dist.min_replicas=3", f"train.checkpoint_every={TAU}"]
    launch = Launch(tmp_path, *COMMON, *ELASTIC, *overrides)
    launch.until(lambda: len(_rounds(tmp_path / "replica_1")) >= 2)
    os.kill(launch.pids()[1], signal.SIGKILL)
    assert launch.wait().error is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged"]["loss"] >= summary["diverged"]["start"]
    elastic = summary["elastic"]
    assert elastic["restarts"] == 1 and elastic["heals"] >= 1  # (a round is voted down if the kill fell inside one)
    assert elastic["replicas"]["1"]["restarts"] == 1 and elastic["replicas"]["1"]["heals"] >= 1
    kept = (tmp_path / "metrics.jsonl").read_text()
    assert kept == (tmp_path / f"replica_{summary['replica']}" / "metrics.jsonl").read_text()
    votes = [r for r in map(json.loads, kept.splitlines()) if "participants" in r]
    assert len(votes) == 192 // TAU and sum(not r["committed"] for r in votes) == elastic["failed_commits"]
    assert (tmp_path / "final.pt").exists()
    warnings = [line for line in capfd.readouterr().err.splitlines() if "the run diverged" in line]
    assert warnings and all(re.match(r"replica \d: warning: the run diverged: ", line) for line in warnings)


def test_sigterm_during_a_quorum_wait_stops_the_run_within_seconds(tmp_path: Path) -> None:
    """Replica 2 killed for good (min_replicas=3, no restarts): the others vote the round down (a kill inside a round)
    or finish it (a kill between two rounds), then wait for a quorum that cannot come (dist.quorum_timeout_s=60); they
    are in that wait once both logged the discarded round, or neither logged anything for 3 s. SIGTERM to the launcher
    then ends their wait at once; each goes on
    alone to its next signal check (every 5 steps), writes its checkpoint and stops: exit code 3, summary.json
    "preempted". Its console, a log file here, has one whole line per event, each naming its replica, and none of
    torchft's or torch's own noise."""
    overrides = [*COMMON, *ELASTIC, "dist.min_replicas=3", "dist.quorum_timeout_s=60", "dist.max_restarts=0"]
    job = Job(*overrides, f"train.checkpoint_every={TAU}", f"run_dir={tmp_path}")
    job.until(lambda: len(_rounds(tmp_path / "replica_0")) >= 2)
    os.kill(job.pids[2], signal.SIGKILL)

    def waiting() -> bool:
        if len(re.findall(r"replica [01]: outer step \d+ discarded", job.stderr)) == 2:
            return True
        logs = [tmp_path / f"replica_{i}" / "metrics.jsonl" for i in (0, 1)]
        return all(time.time() - log.stat().st_mtime > 3.0 for log in logs)

    job.until(waiting)
    time.sleep(1.0)  # (well inside the wait)
    start = time.time()
    job.proc.send_signal(signal.SIGTERM)
    code = job.proc.wait(timeout=90)
    seconds = time.time() - start
    job.wait()
    print(f"SIGTERM during a quorum wait: the run ended {seconds:.1f} s later")
    assert code == 3 and seconds < 10, job.stderr
    stopped = re.search(rf"preempted at step (\d+): checkpoint written to {re.escape(str(tmp_path))}", job.stderr)
    assert stopped and int(stopped.group(1)) % 5 == 0
    assert all((tmp_path / f"replica_{i}/checkpoints/step_{stopped.group(1)}/COMPLETE").exists() for i in (0, 1))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["status"], summary["signal"], summary["step"]) == ("preempted", "SIGTERM", int(stopped.group(1)))
    voted_down = len(re.findall(r"replica 0: outer step \d+ discarded", job.stderr))
    assert summary["elastic"]["failed_commits"] == voted_down and (tmp_path / "metrics.jsonl").exists()
    assert summary["elastic"]["replicas"]["2"] == {
        "status": "failed",
        "restarts": 0,
        "heals": 0,
        "error": "process killed by SIGKILL; not restarted (dist.max_restarts=0)",
    }
    lines = job.stderr.splitlines()
    assert all(re.match(r"(run directory |replica \d: |preempted at step )", line) for line in lines), job.stderr
    assert not re.search(r"\r|Warning|leaked semaphore|GET /|deprecated", job.stderr), job.stderr
    reasons = [re.search(r"discarded \((.*)\)$", line) for line in lines if "discarded" in line]
    assert all(len(reason.group(1)) > 160 for reason in reasons)  # gloo's message whole, not cut at 160


def _screen(output: str) -> list[str]:
    """What a terminal shows once ``output`` is written to it: text, carriage returns, line feeds, ESC[nA (cursor n
    lines up) and ESC[J (clear to the end of the screen); no line wraps."""
    lines, row, col = [""], 0, 0
    for token in re.finditer(r"\x1b\[(\d*)([A-Za-z])|\r|\n|[^\x1b\r\n]+", output):
        text = token.group(0)
        if token.group(2) == "A":
            row = max(0, row - int(token.group(1) or 1))
        elif token.group(2) == "J":
            lines[row] = lines[row][:col]
            del lines[row + 1 :]
        elif text == "\r":
            col = 0
        elif text == "\n":
            row, col = row + 1, 0
            lines.extend([""] * (row + 1 - len(lines)))
        elif not token.group(2):
            lines[row] = lines[row][:col].ljust(col) + text + lines[row][col + len(text) :]
            col += len(text)
    return [line.rstrip() for line in lines]


def test_in_a_terminal_each_replica_has_a_progress_line_of_its_own(tmp_path: Path) -> None:
    """The launcher's stderr a terminal (a pseudo-terminal here), replica 1 killed with -9 halfway: what the screen
    shows at the end is every event on a line of its own, never mixed with a bar, and below them one bar per replica,
    each complete (its last frame, at 96/96)."""
    terminal, replica_side = pty.openpty()
    overrides = [*COMMON, *ELASTIC, "dist.min_replicas=3", "logger.progress=true", f"train.checkpoint_every={TAU}"]
    job = Job(*overrides, f"run_dir={tmp_path}", stderr=replica_side)
    os.close(replica_side)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(terminal, 1 << 16)
            except OSError:  # (EIO: every writer has closed the terminal)
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + 90
    while len(_rounds(tmp_path / "replica_1")) < 3 and job.proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(json.loads((tmp_path / "replicas.json").read_text())["processes"]["1"], signal.SIGKILL)
    assert job.wait() == 0
    reader.join(timeout=10)
    os.close(terminal)
    screen = [line for line in _screen(b"".join(chunks).decode(errors="replace")) if line]
    bars = [line for line in screen if re.match(r"replica_\d: ", line)]
    assert screen[-3:] == bars and [bar[:10] for bar in bars] == ["replica_0:", "replica_1:", "replica_2:"], screen
    assert all(len(re.findall(r"replica_\d: ", bar)) == 1 and "96/96" in bar for bar in bars), screen
    events = screen[: -len(bars)]
    assert any("restart 1" in line for line in events), screen
    assert not any(re.search(r"replica_\d: ", line) for line in events), screen  # no bar mixed into a line
    assert all(re.match(r"(run directory |replica \d: )", line) for line in events), screen
