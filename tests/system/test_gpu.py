"""The GPU path, wherever a CUDA GPU exists (``scripts/gpu_check.sh`` runs these; CI has none and skips them, saying
why): every task trains on cuda with 2 gloo ranks sharing the GPU and with 4 simulated ranks, NCCL at world size
1, bf16 and fp16. The bit-exact kill-and-resume on cuda is in test_crash_resume.py and the device of every tensor in
test_placement.py, both marked ``gpu`` too. One test here runs everywhere: the GPU benchmark's smoke run on the CPU."""

import json
import math
from pathlib import Path

import pytest
import torch

from slowmo.tasks.cifar10 import write_batches
from slowmo.train import checkpoint, run

from datasets import write_imagefolder, write_parallel

ROOT = Path(__file__).resolve().parents[2]
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU on this machine (scripts/gpu_check.sh runs these where there is one)",
)


def task_sections(task: str, tmp: Path) -> dict:
    """A few steps' worth of each task, on files in its native format."""
    if task == "digits":
        return {"model": {"name": "cnn", "width": 8}, "data": {"batch_size": 16}}
    if task == "cifar10":
        root = write_batches(tmp / "cifar", 16)
        return {
            "task": {"name": "cifar10"},
            "model": {"name": "resnet20", "width": 8},
            "data": {"root": str(root), "verify_checksums": False, "batch_size": 8},
        }
    if task == "imagenet":
        root = write_imagefolder(tmp / "imagenet", per_class=8)
        return {
            "task": {"name": "imagenet"},
            "model": {"name": "resnet50"},
            "optimizer": {"lr": 0.01},
            "data": {"root": str(root), "batch_size": 4, "image_size": 64},
        }
    root = write_parallel(tmp / "wmt")
    return {
        "task": {"name": "wmt16", "max_decode_len": 4},
        "model": {"name": "transformer_tiny"},
        "data": {"root": str(root), "max_tokens": 64, "vocab_size": 40, "eval_batch_size": 4},
        "optimizer": {"name": "adam", "lr": 0.001},
    }


def cfg(tmp: Path, task: str, **sections) -> dict:
    base = {
        "run_dir": str(tmp / "run"),
        "logger": {"progress": False, "log_every": 1},
        "train": {"max_steps": 4, "eval_every": 2},
        "algorithm": {"name": "sgp"},
        "slowmo": {"enabled": True, "tau": 2, "update": {"beta": 0.5}},
        **task_sections(task, tmp),
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return base


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend,world", [("gloo", 2), ("simulated", 4)])
@pytest.mark.parametrize("task", ["digits", "cifar10", "imagenet", "wmt16"])
def test_each_task_trains_on_cuda(tmp_path, task, backend, world):
    summary = run(
        cfg(tmp_path, task, dist={"backend": backend, "world_size": world, "device": "cuda"}, data={"num_workers": 2})
    )
    assert summary["device"] == "cuda:0" and summary["steps"] == 4
    assert all(math.isfinite(v) for v in losses(tmp_path / "run"))
    metric = "val_bleu" if task == "wmt16" else "val_acc"
    assert 0 <= summary["final"][metric] <= 100  # (a 4-step val_loss of a ResNet-50 on 16 images may be anything)
    final = torch.load(tmp_path / "run" / "final.pt")["model"]
    assert all(t.device.type == "cpu" for t in final.values())  # loadable without a GPU


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("task", ["cifar10", "wmt16"])
def test_nccl_at_world_size_1(tmp_path, task):
    summary = run(
        cfg(
            tmp_path,
            task,
            dist={"backend": "nccl", "world_size": 1},
            algorithm={"name": "allreduce"},
            slowmo={"enabled": False},
        )
    )
    assert summary["device"] == "cuda:0" and summary["world_size"] == 1
    final = torch.load(tmp_path / "run" / "final.pt")["model"]
    if task == "cifar10":  # ResNets run channels-last on cuda by default
        assert final["stem.0.weight"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda_trains_with_fp32_state(tmp_path, precision):
    summary = run(
        cfg(
            tmp_path,
            "digits",
            dist={"backend": "gloo", "world_size": 2, "device": "cuda"},
            algorithm={"name": "localsgd", "period": 2},
            slowmo={"tau": 4},
            train={"max_steps": 40, "eval_every": 0, "precision": precision, "checkpoint_every": 40},
            logger={"log_every": 4},
            optimizer={"lr": 0.05},
        )
    )
    curve = losses(tmp_path / "run")
    assert curve[-1] < 0.5 * curve[0] and summary["precision"] == precision
    assert summary["skipped_steps"] <= 5  # fp16: the first scales of 2**16 may overflow, then it settles
    state = checkpoint.load_rank(tmp_path / "run" / "checkpoints" / "step_40", 1)
    assert state["optimizer"]["outer"]["update"]["v"].dtype == torch.float32
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())


def test_the_gpu_benchmark_runs_at_toy_sizes_on_the_cpu(tmp_path, monkeypatch):
    """Not a timing: the script's code path, so that it works when a GPU is lent."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its neighbours, as when it runs as a script

    spec = importlib.util.spec_from_file_location("gpu_throughput", ROOT / "benchmarks" / "gpu_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--device", "cpu", "--small", "--out", str(tmp_path)])
    assert [row["goal"] for row in rows] == [0.95, 0.95, 1.0]
    assert all(row["project_loop"] > 0 and row["plain_loop"] > 0 for row in rows)
    assert rows[2]["plain_loop"] == rows[0]["project_loop"]  # the pipeline is compared with the model's images/s
    table = (tmp_path / "throughput.md").read_text()
    assert table.count("\n| ") == 4 and "resnet50 images/s" in table and (tmp_path / "throughput.csv").is_file()
    assert "torch" in json.loads((tmp_path / "provenance.json").read_text())["machine"]
    assert table.strip() in (tmp_path / "README.md").read_text()


def test_the_one_gpu_cifar10_preset_is_the_papers_cells_on_32_simulated_ranks_and_runs_at_toy_sizes(
    tmp_path, monkeypatch
):
    """paper_cifar10_one_gpu is paper_cifar10 (32 workers x 128, the CIFAR ResNet-18, the schedule, SlowMo's settings)
    but for where the workers run; its benchmark runs an outer step of it at toy width and data on the CPU."""
    import importlib.util

    from omegaconf import OmegaConf

    from slowmo.train import compose

    def flat(preset: str) -> dict:
        tree = OmegaConf.to_container(compose([f"+experiment={preset}", "run_dir=x"]), resolve=True)
        return {f"{s}.{k}": v for s, section in tree.items() if isinstance(section, dict) for k, v in section.items()}

    paper, one = flat("paper_cifar10"), flat("paper_cifar10_one_gpu")
    differ = {key for key in paper.keys() | one.keys() if paper.get(key) != one.get(key)}
    assert differ == {"dist.backend", "dist.world_size", "dist.device", "data.num_workers"}
    assert (one["dist.backend"], one["dist.world_size"], one["dist.device"]) == ("simulated", 32, "cuda")
    assert (one["data.batch_size"], one["model.name"], one["train.max_steps"]) == (128, "resnet18", 2442)

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("one_gpu_cifar10", ROOT / "benchmarks" / "one_gpu_cifar10.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    (row,) = bench.main(["--device", "cpu", "--small", "--out", str(tmp_path)])
    assert row["cell"] == "algorithm=osgp slowmo=on" and row["world_size"] == 32 and row["images_per_step"] == 64
    assert 0 < row["s_per_step"] < row["s_per_run"] and row["s_per_epoch"] == pytest.approx(row["s_per_step"] * 80 / 64)
    assert (tmp_path / "one_gpu_cifar10.md").read_text().strip() in (tmp_path / "README.md").read_text()
