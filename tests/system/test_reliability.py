"""Faults inside a run: corrupt or partial checkpoints, NaNs, and a rank that dies (real gloo processes)."""

import itertools
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from slowmo.comm import spawn
from slowmo.train import NonFiniteLoss, checkpoint, loop, run, validate

ROOT = Path(__file__).resolve().parents[2]


def cfg(run_dir, **sections):
    base = {
        "run_dir": str(run_dir),
        "logger": {"progress": False, "log_every": 5},
        "dist": {"world_size": 2},
        "train": {"max_steps": 24, "eval_every": 0, "checkpoint_every": 8, "keep_checkpoints": 3},
        "algorithm": {"name": "sgp"},
        "slowmo": {"enabled": True, "tau": 4, "update": {"beta": 0.5}},
        "data": {"batch_size": 16},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return base


def _final(run_dir):
    return torch.load(run_dir / "final.pt")["model"]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _other_version(path):
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"slowmo-checkpoint 1 ", b"slowmo-checkpoint 9 ", 1))


@pytest.mark.parametrize(
    "damage,why",
    [
        (_truncate, "rank0.pt: checksum mismatch (truncated or corrupt)"),
        (_other_version, "rank0.pt: checkpoint format version 9, this slowmo reads version 1"),
    ],
)
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one_in_one_line(tmp_path, damage, why, capsys):
    straight = run(cfg(tmp_path / "straight"))
    run(cfg(tmp_path / "resumed", train={"max_steps": 16}))
    damage(tmp_path / "resumed" / "checkpoints" / "step_16" / "rank0.pt")
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no Python warning on the way
        resumed = run(cfg(tmp_path / "resumed"))
    step_8 = tmp_path / "resumed" / "checkpoints" / "step_8"
    assert f"resuming at step 8 from {step_8} (step_16: {why}: skipped)" in capsys.readouterr().err.splitlines()
    a, b = _final(tmp_path / "straight"), _final(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed from step 8, replayed 8..24 exactly
    assert resumed["final"] == straight["final"]


def test_a_run_whose_only_checkpoint_is_damaged_says_it_starts_over(tmp_path, capsys):
    run(cfg(tmp_path, train={"max_steps": 8}))
    _truncate(tmp_path / "checkpoints" / "step_8" / "rank1.pt")  # another rank's: rank 0 knows only that it failed
    capsys.readouterr()
    summary = run(cfg(tmp_path, train={"max_steps": 12}))
    err = capsys.readouterr().err.splitlines()
    said = (
        "starting over at step 0: no checkpoint could be read (step_8: another rank could not read its file: skipped)"
    )
    assert said in err
    assert summary["steps"] == 12


def test_a_checkpoint_without_its_complete_marker_is_ignored(tmp_path):
    run(cfg(tmp_path / "run", train={"max_steps": 16}))
    (tmp_path / "run" / "checkpoints" / "step_16" / checkpoint.MARKER).unlink()  # as if killed while saving
    assert [d.name for d in checkpoint.sorted_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_8"]
    run(cfg(tmp_path / "run"))
    run(cfg(tmp_path / "straight"))
    a, b = _final(tmp_path / "straight"), _final(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    build = loop._Trainer._build_task

    def with_a_nan_sample(trainer):  # one training image of NaNs: the loss of the step that meets it is NaN
        task = build(trainer)
        task.train_set.tensors[0][700] = float("nan")
        return task

    monkeypatch.setattr(loop._Trainer, "_build_task", with_a_nan_sample)
    with pytest.raises(
        NonFiniteLoss,
        match=r"^rank \d: loss is (nan|inf) at step \d+; stopped before any checkpoint "
        r"of it was written \(lower optimizer.lr or check the data\)$",
    ) as info:
        run(cfg(tmp_path, train={"checkpoint_every": 1, "max_steps": 50}))
    bad_step = int(str(info.value).split(" at step ")[1].split(";")[0])
    summary = json.loads((tmp_path / "summary.json").read_text())  # its record: where and why it stopped
    assert (summary["status"], summary["error"]) == ("diverged", str(info.value)) and summary["steps"] <= bad_step
    kept = checkpoint.sorted_checkpoints(tmp_path / "checkpoints")
    # the last good one is that of step bad_step (or bad_step - 1 if a rank stopped before rank 0 marked it)
    assert kept and int(kept[-1].name[5:]) in (bad_step - 1, bad_step)
    assert max(int(d.name[5:]) for d in (tmp_path / "checkpoints").iterdir()) <= bad_step
    for directory in kept:
        state = checkpoint.load_rank(directory, 0)
        assert all(torch.isfinite(t).all() for t in state["model"].values())


def _poisoned_optimizer(at_step):
    build = loop.build_optimizer

    def poisoned(config, model, comm):
        opt = build(config, model, comm)
        step, calls = opt.step, itertools.count(1)

        def poisoning_step():
            step()
            if next(calls) == at_step and comm.rank == 1:  # a fault the loss does not show yet
                next(model.parameters()).data[0, 0] = float("nan")

        opt.step = poisoning_step
        return opt

    return poisoned


def test_a_nan_parameter_is_never_checkpointed(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "build_optimizer", _poisoned_optimizer(at_step=16))
    with pytest.raises(
        NonFiniteLoss,
        match=r"^rank 1: 1.weight is not finite at step 16; no checkpoint of it was "
        r"written, the last good one is kept",
    ):
        run(cfg(tmp_path))
    assert [d.name for d in checkpoint.sorted_checkpoints(tmp_path / "checkpoints")] == ["step_8"]
    assert not (tmp_path / "checkpoints" / "step_16" / "rank1.pt").exists()


# --------------------------------------------------------------------------------------- a rank that dies
def _train_and_die(comm, config, run_dir, victim, at_step):
    """One rank of a real run; ``victim`` is SIGKILLed as it starts its ``at_step``-th optimizer step."""
    if comm.rank == victim:
        build = loop.build_optimizer

        def dying(config, model, comm):
            opt = build(config, model, comm)
            step, calls = opt.step, itertools.count(1)

            def step_or_die():
                if next(calls) == at_step:
                    os.kill(os.getpid(), signal.SIGKILL)
                step()

            opt.step = step_or_die
            return opt

        loop.build_optimizer = dying
    return loop.train_rank(comm, config, run_dir)


@pytest.mark.parametrize("algorithm", ["allreduce", "sgp", "osgp"])
def test_no_hang_when_a_rank_dies(tmp_path, algorithm):
    config = validate(
        cfg(tmp_path, algorithm={"name": algorithm}, dist={"world_size": 3, "timeout_s": 5}, train={"max_steps": 200})
    )
    start = time.time()
    with pytest.raises(RuntimeError) as info:
        spawn(_train_and_die, 3, "gloo", args=(config, tmp_path, 1, 7), timeout=5)
    elapsed = time.time() - start
    lines = str(info.value).splitlines()
    assert lines[0] == "3 of 3 ranks failed:"
    assert lines[2] == "rank 1: process killed by SIGKILL before reporting: this is the lost rank"
    for survivor, line in ((0, lines[1]), (2, lines[3])):
        assert line.startswith(f"rank {survivor}: slowmo.comm.base.CommError: rank {survivor}: ")
        assert "(a peer died" in line or "(the peer died" in line
        steps = (7, 8) if algorithm == "osgp" else (7,)  # OSGP waits for step 7's messages at step 8
        assert any(line.endswith(f"(during step {s})") for s in steps), line
    assert elapsed < 60
    assert multiprocessing.active_children() == []  # no orphan
    summary = json.loads((tmp_path / "summary.json").read_text())  # rank 0's record of the failed run
    assert summary["status"] == "failed" and summary["error"].startswith("rank 0: ") and summary["steps"] in (6, 7)


# ------------------------------------------------------------------------------------------------ a signal
def _digits(run_dir, steps):
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "experiments/digits/train.py"),
            "dist.world_size=2",
            f"train.max_steps={steps}",
            "train.eval_every=0",
            "logger.progress=false",
            "logger.log_every=5",
            "algorithm=osgp",
            "slowmo=on",
            f"hydra.run.dir={run_dir}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigusr1_checkpoints_exits_3_and_the_rerun_ends_where_an_uninterrupted_run_does(tmp_path):
    job = _digits(tmp_path / "run", 400)
    while not ((tmp_path / "run" / "metrics.jsonl").is_file() and (tmp_path / "run" / "metrics.jsonl").read_text()):
        assert job.poll() is None, job.communicate()[1]
        time.sleep(0.02)
    job.send_signal(signal.SIGUSR1)
    _, err = job.communicate(timeout=300)
    assert job.returncode == 3, err[-3000:]
    stopped = int(
        re.search(
            r"^preempted at step (\d+): checkpoint written to \S+; rerun with hydra.run.dir=\S+ to resume$", err, re.M
        ).group(1)
    )
    assert 5 <= stopped < 400 and stopped % 5 == 0  # the ranks agree every train.signal_check_every = 5 steps
    assert [d.name for d in checkpoint.sorted_checkpoints(tmp_path / "run" / "checkpoints")] == [f"step_{stopped}"]
    for run_dir in ("run", "straight"):
        job = _digits(tmp_path / run_dir, 400)
        assert job.wait(timeout=300) == 0, job.communicate()[1][-3000:]
    a, b = _final(tmp_path / "straight"), _final(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)
