"""A run's life, on every launcher: a run directory's run is never lost without being asked, a signal to the
launcher stops every rank after a checkpoint, the first line says where the run is and how to resume it, a run that
diverges says so, and every mistake on the command line is one line. Real processes where the case is about
processes (the command line, gloo ranks, signals, kill -9)."""

import json
import sys
import time
from pathlib import Path

import pytest

from slowmo.train import checkpoint, compose, run, validate
from slowmo.train.cli import check_command_line
from slowmo.train.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


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


def test_a_run_that_failed_at_its_last_step_is_finished_by_a_rerun_not_reported_done(tmp_path, monkeypatch):
    """A peer killed after the last step's checkpoint, during the final average: rank 0 records ``failed`` at
    step max_steps. A rerun resumes from that checkpoint and does the run's end (its final metrics, ``final.pt``)
    instead of taking the record for a completed run (it once said "nothing to do" and had no final metrics)."""
    from slowmo.comm.base import CommError
    from slowmo.train.loop import _Trainer

    straight = run(cfg(tmp_path / "straight"))
    finish = _Trainer._finish

    def peer_lost(self, ending):
        raise CommError("a peer died")

    monkeypatch.setattr(_Trainer, "_finish", peer_lost)
    with pytest.raises(CommError):
        run(cfg(tmp_path / "run"))
    failed = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert failed["status"] == "failed" and failed["steps"] == 20 and not (tmp_path / "run" / "final.pt").exists()
    monkeypatch.setattr(_Trainer, "_finish", finish)
    summary = run(cfg(tmp_path / "run"))
    assert summary["status"] == "completed" and summary["final"] == straight["final"]
    assert (tmp_path / "run" / "final.pt").exists()


def test_a_finished_run_of_a_key_this_code_lacks_is_refused_not_reused(tmp_path):
    """A run directory written by older code (a setting under a key that has moved since, e.g. ``slowmo.beta`` before
    it became ``slowmo.update.beta``) is another run: a rerun, and a preset's cell runner that would skip it as
    finished, refuse it in one line naming the key, and touch nothing."""
    import yaml

    from slowmo.cells import run_cells

    cell = ["slowmo=on", "train.max_steps=4", "train.eval_every=0", "dist.world_size=2", "logger.progress=false"]
    directory = run_cells(None, [cell], tmp_path)[0]
    recorded = yaml.safe_load((directory / "config.yaml").read_text())
    recorded["slowmo"]["beta"] = recorded["slowmo"]["update"].pop("beta")  # as the older code wrote it
    (directory / "config.yaml").write_text(yaml.safe_dump(recorded))
    before = _files(directory)
    command = [*cell, f"run_dir='{directory}'"]
    for again in (lambda: run_cells(None, [cell], tmp_path), lambda: run(compose(command))):
        with pytest.raises(ConfigError, match=r"holds another run \(slowmo\.beta: 0\.6 there, no such key here\); "):
            again()
    assert _files(directory) == before


def test_run_cells_reports_each_cell_as_it_finishes_so_a_stopped_sweep_keeps_it(tmp_path):
    """``done(i, directory)`` is called for each cell once its run is finished, in order, before the pool returns (the
    fidelity ledger appends each run there: a sweep stopped mid-round keeps what it finished)."""
    from slowmo.cells import run_cells
    from slowmo.report import finished

    common = ["train.max_steps=4", "train.eval_every=0", "dist.world_size=2", "logger.progress=false"]
    cells = [[*common, f"seed={seed}"] for seed in (0, 1, 2)]
    seen = []
    directories = run_cells(None, cells, tmp_path, jobs=2, done=lambda i, d: seen.append((i, d, finished(d))))
    assert seen == [(i, d, True) for i, d in enumerate(directories)] and len(set(directories)) == 3


def test_a_cell_that_picks_a_config_group_option_runs_in_one_directory(tmp_path):
    """``slowmo/mean=eager`` in a cell: its run directory is one child of the root, not a path through ``slowmo/``."""
    from slowmo.cells import run_cells
    from slowmo.report import finished

    cell = ["slowmo=on", "slowmo/mean=eager", "train.max_steps=4", "train.eval_every=0", "dist.world_size=2"]
    directory = run_cells(None, [cell], tmp_path)[0]
    assert (
        directory.parent == tmp_path
        and finished(directory)
        and [p.name for p in tmp_path.iterdir()] == [directory.name]
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
    assert f"run directory {tmp_path}: continuing the run it holds from its newest readable checkpoint; " in err
    assert f"resuming at step 10 from {tmp_path / 'checkpoints' / 'step_10'}\n" in err
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
    config = validate(cfg(tmp_path / "run"))
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
            ["slowmo.update.beta=[1"],
            "cannot read the command line: no viable alternative at input '[1' (Hydra's override grammar)",
        ),
    ],
)
def test_hydras_own_failures_are_one_line_with_the_choices(args, line):
    with pytest.raises(ConfigError) as info:
        check_command_line(args, "train_digits")
    assert str(info.value) == line  # never Hydra's advice to write +key=value, which the config then refuses
