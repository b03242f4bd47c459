"""The shared training loop end to end on digits, in this process: learning, run-directory contents, resume equality,
W&B offline, every preset's cells. (Against gloo ranks: system/test_gloo.py; sweeps and plots through the command
line: system/test_command_line.py.)"""

import json
from pathlib import Path

import pytest
import torch

from slowmo.train import compose, run, validate

ROOT = Path(__file__).resolve().parents[2]


def cfg(run_dir, **sections):
    base = {
        "run_dir": str(run_dir),
        "logger": {"progress": False, "log_every": 5},
        "train": {"max_steps": 40, "eval_every": 20},
        "dist": {"world_size": 4},
        "data": {"batch_size": 16},
        "optimizer": {"lr": 0.05},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base


@pytest.mark.parametrize("algorithm,slowmo", [("localsgd", True), ("sgp", True), ("allreduce", False)])
def test_digits_learns_and_the_run_directory_is_complete(tmp_path, algorithm, slowmo):
    summary = run(
        cfg(
            tmp_path,
            algorithm={"name": algorithm, **({"period": 4} if algorithm == "localsgd" else {})},
            slowmo={"enabled": slowmo, "tau": 4, "update": {"beta": 0.5}},
        )
    )
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        assert {"step", "epoch", "train_loss", "lr", "comm_bytes", "wall_time"} <= set(line)
    assert {"val_loss", "val_acc"} <= set(lines[-1]) and {"val_loss", "val_acc"} <= set(lines[3])
    assert lines[-1]["train_loss"] < 0.5 * lines[0]["train_loss"]
    assert summary["final"]["val_acc"] > 60.0  # 10 classes: chance is 10 %
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 40
    assert (tmp_path / "config.yaml").is_file()
    model = torch.load(tmp_path / "final.pt")["model"]
    assert set(model) == {"1.weight", "1.bias", "3.weight", "3.bias", "5.weight", "5.bias"}
    assert [line["step"] for line in lines] == list(range(5, 45, 5))
    assert lines[-1]["comm_bytes"] == summary["comm_bytes"] > 0


@pytest.mark.parametrize(
    "algorithm,schedule",
    [
        ("localsgd", {"name": "constant"}),
        ("osgp", {"name": "constant"}),
        ("localsgd", {"name": "step", "warmup_epochs": 1.0, "warmup_init_lr": 0.1, "milestones": [1.5]}),
    ],
)
def test_an_interrupted_run_resumes_to_the_same_final_model(tmp_path, algorithm, schedule):
    common = dict(
        model={"name": "cnn", "width": 8},
        algorithm={"name": algorithm, **({"period": None} if algorithm == "localsgd" else {})},
        slowmo={"enabled": True, "tau": 6, "base_buffers": "reset", "update": {"beta": 0.6}},
        schedule=schedule,
    )
    straight = run(cfg(tmp_path / "straight", train={"max_steps": 30, "eval_every": 10}, **common))
    run(cfg(tmp_path / "resumed", train={"max_steps": 14, "checkpoint_every": 7, "eval_every": 10}, **common))
    resumed = run(cfg(tmp_path / "resumed", train={"max_steps": 30, "checkpoint_every": 7, "eval_every": 10}, **common))
    a = torch.load(tmp_path / "straight" / "final.pt")["model"]
    b = torch.load(tmp_path / "resumed" / "final.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final"] == straight["final"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # the resumed log continues without duplicates
    kept = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert kept == ["step_21", "step_28"]  # keep_checkpoints = 2


def test_wandb_logs_offline_without_an_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(
        cfg(
            tmp_path / "sweep" / "cell",
            logger={"wandb": True, "progress": False, "log_every": 5},
            train={"max_steps": 10, "eval_every": 5},
        )
    )
    offline = list((tmp_path / "sweep" / "cell" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("*.wandb"))  # the run's history, ready for `wandb sync`


def test_every_cell_of_every_experiment_preset_is_a_valid_config():
    """The presets that made the committed results (and the paper's) compose and pass every check, cell by cell
    (each cell once, whatever its seeds: the seed changes no check)."""
    from slowmo.train.config import CONFIG_DIR, sweep

    presets = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
    assert {"quickstart", "repro_table1_digits", "paper_cifar10", "paper_wmt16"} <= set(presets)
    for preset in presets:
        cells = sweep(preset) or [[]]
        assert preset.startswith("paper_") or len(cells) >= 5  # the result presets sweep their cells and seeds
        unseeded = {tuple(o for o in cell if not o.startswith("seed=")) for cell in cells}
        for cell in sorted(unseeded):
            config = validate(compose([f"+experiment={preset}", *cell, "run_dir=x"]))
            assert config.experiment == preset
            if config.algorithm.name == "localsgd":  # H follows tau, as the paper's presets tie them
                assert config.algorithm.period == config.slowmo.tau


@pytest.mark.parametrize("world_size", [2, 8])
def test_the_outer_presets_yaml_defaults_are_their_python_functions(world_size):
    """slowmo=bmuf|lookahead|diloco (YAML defaults of the parts) build the updates slowmo.presets' functions return with
    their papers' defaults (BMUF's block momentum 1 - 1/m included), with their own tau and label: one set of
    defaults, written twice, kept equal."""
    import slowmo

    for preset, expected, tau, label in (
        ("bmuf", slowmo.presets.bmuf(world_size), 12, "BMUF"),
        ("lookahead", slowmo.presets.lookahead(), 5, "Lookahead"),
        ("diloco", slowmo.presets.diloco(), 500, "DiLoCo"),
    ):
        outer = validate(compose([f"slowmo={preset}", f"dist.world_size={world_size}", "run_dir=x"])).slowmo
        assert repr(outer.arguments()["update"]) == repr(expected), preset
        assert (outer.tau, outer.label) == (tau, label)
