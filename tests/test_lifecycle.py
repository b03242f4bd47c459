"""A run's life, on every launcher: a run directory's run is never lost without being asked, a signal to the
launcher stops every rank after a checkpoint, the first line says where the run is and how to resume it, a run that
diverges says so, and every mistake on the command line is one line. Real processes where the case is about
processes (the command line, gloo ranks, signals, kill -9)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slowmo.train import checkpoint, run, validate
from slowmo.train.cli import check_command_line
from slowmo.train.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def cfg(run_dir, **sections):
    base = {
        "run_dir": str(run_dir),
        "logger": {"progress": False, "log_every": 5},
        "dist": {"world_size": 2},
        "train": {"max_steps": 20, "eval_every": 0, "checkpoint_every": 10},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return base


def _files(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()
    }


# ------------------------------------------------------------------------------------------ the run directory
def test_rerunning_a_completed_run_does_nothing_and_touches_nothing(tmp_path, capsys):
    first = run(cfg(tmp_path))
    before = _files(tmp_path)
    again = run(cfg(tmp_path, train={"eval_every": 5}, dist={"backend": "gloo"}))  # run control may differ
    assert again == json.loads((tmp_path / "summary.json").read_text())
    assert again["final"] == first["final"] and again["steps"] == 20
    assert _files(tmp_path) == before
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"run directory {tmp_path}: its run completed 20 steps, nothing to do (raise train.max_steps to train on, "
        "or add train.overwrite=true to start again)"
    )


def test_overwrite_discards_the_run_and_a_requeued_attempt_resumes_instead(tmp_path, monkeypatch, capsys):
    run(cfg(tmp_path, train={"max_steps": 30}))
    assert [d.name for d in checkpoint.sorted_checkpoints(tmp_path / "checkpoints")] == ["step_20", "step_30"]
    run(cfg(tmp_path, algorithm={"name": "sgp"}, train={"overwrite": True, "max_steps": 10}))
    assert [d.name for d in checkpoint.sorted_checkpoints(tmp_path / "checkpoints")] == ["step_10"]
    assert "name: sgp" in (tmp_path / "config.yaml").read_text()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10]  # the discarded run's lines are gone, not mixed in
    assert json.loads((tmp_path / "summary.json").read_text())["algorithm"] == "sgp"
    capsys.readouterr()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the same job, requeued: what its first attempt wrote is kept
    summary = run(cfg(tmp_path, algorithm={"name": "sgp"}, train={"overwrite": True, "max_steps": 20}))
    err = capsys.readouterr().err
    assert f"run directory {tmp_path}: continuing the run it holds from its newest complete checkpoint (step 10)" in err
    assert f"resuming from {tmp_path / 'checkpoints' / 'step_10'} (step 10)" in err
    assert summary["steps"] == 20


class _Clock:
    """stderr that notes when its first line was written."""

    def __init__(self):
        self.lines, self.first_at = [], None

    def write(self, text):
        if self.first_at is None and text.strip():
            self.first_at = time.perf_counter()
        self.lines.append(text)

    def flush(self):
        pass


def test_the_first_line_names_the_run_directory_and_how_to_resume_within_a_second(tmp_path, monkeypatch):
    config = validate(cfg(tmp_path / "run", dist={"backend": "gloo"}))
    valid_at = time.perf_counter()
    clock = _Clock()
    monkeypatch.setattr(sys, "stderr", clock)
    run(config, rerun="hydra.run.dir=X")
    monkeypatch.undo()
    assert "".join(clock.lines).splitlines()[0] == (
        f"run directory {tmp_path / 'run'}: a new run; if it stops, rerun with hydra.run.dir=X to resume it"
    )
    assert clock.first_at - valid_at < 1.0


# ------------------------------------------------------------------------------------------------ divergence
def _diverging(run_dir, stop: bool) -> dict:
    """Digits on 2 ranks; at epoch 8 the step schedule multiplies the lr by 10 (gamma = 10): the loss, down from 2.1
    to about 0.03, climbs back above its start."""
    return cfg(
        run_dir,
        schedule={"name": "step", "warmup_epochs": 0.0, "milestones": [8.0], "gamma": 10.0},
        train={"max_steps": 260, "checkpoint_every": 0, "stop_on_divergence": stop},
        logger={"log_every": 10},
    )


def _first_climb_back(run_dir: Path) -> int:
    """The rule, written from the README: the first logged train loss at or above the first one, once a logged loss
    has been at most half the first."""
    losses = [
        (r["step"], r["train_loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    ]
    start, halved = losses[0][1], False
    for step, loss in losses:
        halved = halved or loss <= start / 2
        if halved and loss >= start:
            return step
    raise AssertionError("the run did not diverge")


def test_a_diverged_run_is_marked_and_warned_about_once(tmp_path, capsys):
    summary = run(_diverging(tmp_path, stop=False))
    step = _first_climb_back(tmp_path)
    assert 150 < step < 260 and summary["steps"] == 260
    assert summary["status"] == "diverged" and summary["diverged"]["step"] == step
    assert json.loads((tmp_path / "summary.json").read_text())["diverged"]["stopped"] is False
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: the run diverged")]
    assert len(warnings) == 1 and f" at step {step}, " in warnings[0]


def test_stop_on_divergence_ends_the_run_there(tmp_path):
    summary = run(_diverging(tmp_path, stop=True))
    step = summary["diverged"]["step"]
    assert summary["status"] == "diverged" and summary["steps"] == step and summary["diverged"]["stopped"]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == step
    assert _first_climb_back(tmp_path) == step
    assert run(_diverging(tmp_path, stop=True)) == summary  # a rerun has nothing to do


# ------------------------------------------------------------------------------------------------ the command line
@pytest.mark.parametrize(
    "args,line",
    [
        (["slowmo=true"], "slowmo=true: slowmo is a config group; choose one of bmuf, diloco, lookahead, off, on"),
        (
            ["algorithm=local_sgd"],
            "algorithm=local_sgd: no such option; choose one of allreduce, localsgd, osgp, sgp (did you mean "
            "localsgd?)",
        ),
        (
            ["-m", "algorithm=localsgd,sgpp"],
            "algorithm=sgpp: no such option; choose one of allreduce, localsgd, osgp, sgp (did you mean sgp?)",
        ),
        (["train.max_step=10"], "train.max_step is not a key of train; did you mean train.max_steps?"),
        (["trian.max_steps=10"], "trian is not a key of the config; did you mean train?"),
        (
            ["algorithm=sgp", "algorithm.period=3"],
            "algorithm.period is not a key of algorithm; the keys of algorithm are graph, name, procs_per_node",
        ),
        (
            ["+train.max_steps=10"],
            "+train.max_steps: train.max_steps exists already; set it without the +: train.max_steps=...",
        ),
        (
            ["train.max_steps=many"],
            "bad value for train.max_steps: Value 'many' of type 'str' could not be converted to Integer",
        ),
        (
            ["slowmo.beta=[1"],
            "cannot read the command line: no viable alternative at input '[1' (Hydra's override grammar)",
        ),
    ],
)
def test_hydras_own_failures_are_one_line_with_the_choices(args, line):
    with pytest.raises(ConfigError) as info:
        check_command_line(args, "train_digits")
    assert str(info.value) == line  # never Hydra's advice to write +key=value, which the config then refuses


def _command(*args, backend="gloo"):
    return [sys.executable, str(ROOT / "experiments/digits/train.py"), f"dist={backend}", "dist.world_size=2", *args]


def test_the_command_line_is_one_line_and_exit_2_for_hydra_and_for_a_rank(tmp_path):
    out = subprocess.run(_command("slowmo=true"), capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stderr.splitlines()) == (
        2,
        ["error: slowmo=true: slowmo is a config group; choose one of bmuf, diloco, lookahead, off, on"],
    )
    # raised inside the gloo ranks (the task's data check): printed once, by the launcher
    args = ("task=cifar10", f"data.root={tmp_path}", "model=resnet20", f"hydra.run.dir={tmp_path / 'run'}")
    out = subprocess.run(_command(*args), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines()[1:] == [
        f"error: CIFAR-10 files missing under {tmp_path}/cifar-10-batches-py: data_batch_1, data_batch_2, "
        "data_batch_3, data_batch_4, data_batch_5, test_batch, batches.meta; point data.root at the directory holding "
        "cifar-10-batches-py/ or add data.download=true (files written by hand, not the official batches, need "
        "data.verify_checksums=false)"
    ]


# ------------------------------------------------------------------------------------------------ signals
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
        _command("train.max_steps=100000", *logging, f"hydra.run.dir={run_dir}", *args, backend=backend),
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
    assert checkpoint.candidates(run_dir / "checkpoints", 2)  # saved by both ranks
    assert _alive(ranks) == []


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
    assert _alive(ranks) == []


def test_no_rank_outlives_a_launcher_killed_by_sigkill(tmp_path):
    job = _start(tmp_path / "run", "gloo")
    ranks = _descendants(job.pid)
    assert len(ranks) >= 3  # the fork server and the two ranks
    job.kill()
    job.communicate(timeout=60)
    deadline = time.time() + 10
    while _alive(ranks) and time.time() < deadline:
        time.sleep(0.1)
    assert _alive(ranks) == []


def test_the_ranks_take_the_launchers_environment(tmp_path, monkeypatch):
    # the fork server started with an earlier environment; a rank sees the launcher's of the moment
    from slowmo.comm import spawn

    spawn(_read_mark, 1, "gloo")  # the fork server is running now
    monkeypatch.setenv("SLOWMO_TEST_MARK", "now")
    assert spawn(_read_mark, 2, "gloo") == ["now", "now"]


def _read_mark(comm):
    return os.environ.get("SLOWMO_TEST_MARK")
