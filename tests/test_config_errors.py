"""Bad configurations and bad data: each fails at start with one line that says what is wrong and what to do."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from datasets import write_cifar10, write_imagefolder, write_parallel
from slowmo.train import ConfigError, run, validate

ROOT = Path(__file__).resolve().parents[1]


def base(tmp_path, **sections):
    cfg = {"run_dir": str(tmp_path / "run"), "logger": {"progress": False}, "train": {"max_steps": 2, "eval_every": 0},
           "dist": {"world_size": 2}}
    cfg.update(sections)
    return cfg


@pytest.mark.parametrize("cfg,message", [
    ({"train": {"max_step": 3}}, "bad config key 'train.max_step'"),
    ({"train": {"max_steps": "many"}}, "bad config key 'train.max_steps'"),
    ({"seeds": 1}, "bad config key 'seeds'"),
    ({"algorithm": {"name": "gossip"}}, "algorithm.name='gossip' is not one of allreduce, localsgd, sgp, osgp"),
    ({"dist": {"backend": "mpi"}}, "dist.backend='mpi' is not one of simulated, gloo, nccl"),
    ({"train": {"max_steps": 0}}, "train.max_steps must be >= 1, got 0"),
    ({"train": {"resume": "sometimes"}}, "train.resume must be 'auto' or 'never'"),
    ({"experiment": "paper_imagenet", "task": {"name": "cifar10"}},
     "+experiment=paper_imagenet is the preset of task imagenet, but the task is cifar10"),
])
def test_schema_errors(cfg, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        validate(cfg)
    assert "\n" not in str(info.value)


def _cifar_missing(tmp_path):
    return {"root": str(write_cifar10(tmp_path / "c", per_batch=4, skip=("data_batch_3", "test_batch"))),
            "verify_checksums": False}


def _wmt_mismatched(tmp_path):
    root = write_parallel(tmp_path / "w")
    (root / "train.de").write_text("nur eine zeile\n")
    return {"root": str(root)}


def _wmt_empty(tmp_path):
    root = write_parallel(tmp_path / "w")
    (root / "train.en").write_text("\n" * 64)
    (root / "train.de").write_text("\n" * 64)
    return {"root": str(root)}


def _empty_imagefolder(tmp_path):
    root = write_imagefolder(tmp_path / "i")
    for png in (root / "val").rglob("*.png"):
        png.unlink()
    return {"root": str(root), "image_size": 32}


@pytest.mark.parametrize("sections,message", [
    (lambda p: dict(slowmo={"enabled": True, "tau": 0}), "tau must be an integer >= 1"),
    (lambda p: dict(slowmo={"enabled": True, "beta": 1.0}), r"beta must be in \[0, 1\)"),
    (lambda p: dict(slowmo={"enabled": True, "alpha": -1.0}), "alpha must be a finite number > 0"),
    (lambda p: dict(algorithm={"name": "sgp"}, dist={"world_size": 1}), "SGP gossips between ranks and needs at least 2"),
    (lambda p: dict(algorithm={"name": "osgp", "procs_per_node": 3}, dist={"world_size": 4}),
     "world size 4 is not divisible by algorithm.procs_per_node=3"),
    (lambda p: dict(task={"name": "cifar10"}), "task cifar10 needs data.root"),
    (lambda p: dict(task={"name": "cifar10"}, data=_cifar_missing(p)),
     "CIFAR-10 files missing under .*: data_batch_3, test_batch"),
    (lambda p: dict(task={"name": "imagenet"}, data={"root": str(p / "nowhere")}), "ImageNet split missing"),
    (lambda p: dict(task={"name": "imagenet"}, data=_empty_imagefolder(p), model={"name": "resnet50"}),
     "no images under .*val"),
    (lambda p: dict(task={"name": "wmt16"}, data=_wmt_mismatched(p), model={"name": "transformer_tiny"}),
     "train.en has 64 lines but train.de has 1"),
    (lambda p: dict(task={"name": "wmt16"}, data=_wmt_empty(p), model={"name": "transformer_tiny"}),
     "the training text is empty"),
    (lambda p: dict(task={"name": "wmt16"}, data=_wmt_mismatched(p), model={"name": "mlp"}),
     "task wmt16 needs a Transformer"),
    (lambda p: dict(data={"batch_size": 4096}), "the training set gives no full batch to each of 2 ranks"),
])
def test_bad_runs_fail_at_start(tmp_path, sections, message):
    with pytest.raises(ValueError, match=message) as info:
        run(base(tmp_path, **sections(tmp_path)))
    assert "\n" not in str(info.value)


def test_an_unwritable_run_directory(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="run directory .* is not writable"):
        run(base(tmp_path, run_dir=str(tmp_path / "file" / "run")))


def test_resuming_a_run_of_another_model_is_refused(tmp_path):
    run(base(tmp_path, train={"max_steps": 2, "checkpoint_every": 2, "eval_every": 0}))
    with pytest.raises(ConfigError, match="the checkpoint in .* is of another run"):
        run(base(tmp_path, model={"name": "cnn"}, train={"max_steps": 4, "checkpoint_every": 2, "eval_every": 0}))
    assert (tmp_path / "run" / "checkpoints" / "step_2" / "COMPLETE").is_file()  # nothing lost
    assert (tmp_path / "run" / "summary.json").is_file()


def _cli(*args):
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, str(ROOT / "experiments/digits/train.py"), *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_command_line_errors(tmp_path):
    out = _cli("slowmo=on", "slowmo.beta=1.0", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: beta must be in [0, 1)")
    assert "Traceback" not in out.stderr
    out = _cli("train.max_step=3", f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0 and "Key 'max_step' not in 'TrainConfig'" in out.stderr
