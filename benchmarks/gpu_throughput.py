"""GPU throughput: the project's training loop against a plain PyTorch loop, and the input pipeline against the model.

Measured side by side in one run, at world size 1 (one GPU, NCCL):

1. ResNet-50, 224 px, batch 128, bf16 autocast, channels-last, SGD + Nesterov: images/s of the project's loop
   (``slowmo.train.train_rank``: AR-SGD, batches through its DataLoader with pinned memory and side-stream copies,
   lr schedule, logging) against a plain hand-written loop (same model, batch, precision and optimizer, on one batch
   already on the GPU). Goal: >= 0.95x.
2. ``transformer_wmt_en_de``, batches of 128 sentence pairs x 64 tokens (8,192 target tokens), bf16, Adam: target
   tokens/s, likewise. Goal: >= 0.95x.
3. The input pipeline alone: the imagenet task's training transforms (random resized crop, flip, to tensor,
   normalize) over an ImageFolder of 500x375 JPEGs (ImageNet's typical size), 8 DataLoader workers, batch 128:
   images/s against ResNet-50's images/s in 1. Goal: >= 1x (the pipeline is not the bottleneck).

Writes ``<out>/throughput.csv`` and ``throughput.md`` (default ``results/gpu_throughput``), naming the GPU, and
the ``README.md`` of them.
Run: ``python benchmarks/gpu_throughput.py`` (about 5 minutes on an H100); ``scripts/gpu_check.sh`` runs it after
the GPU tests. ``--device cpu --small`` runs the same code at toy sizes on the CPU (the test suite does, so that
this script keeps working where no GPU is).
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import Dataset

from slowmo.comm import Single, free_port
from slowmo.comm.launch import DistEnv, init_distributed
from slowmo.models import Transformer, build_model
from slowmo.tasks import TASKS, Task, TaskContext
from slowmo.tasks.base import ImageData, classification
from slowmo.tasks.wmt16 import EOS, PAD, collate, translation_loss
from slowmo.train import data, train_rank, validate
from slowmo.train.config import Config, to_dict
from slowmo.train.optimizers import OPTIMIZERS

from common import config, gpu_arguments, read
from readme import record

SIZES = {  # name: image px, images per batch, sentence pairs per batch, tokens per sentence, timed steps, JPEGs
    "full": dict(
        px=224,
        images=128,
        pairs=128,
        tokens=64,
        steps=60,
        warmup=20,
        jpegs=2048,
        workers=8,
    ),
    "small": dict(
        px=32,
        images=4,
        pairs=4,
        tokens=8,
        steps=2,
        warmup=1,
        jpegs=16,
        workers=1,
    ),
}
VOCAB = 32000
SPEC = read("gpu_throughput")  # configs/benchmark/gpu_throughput.yaml: what each measure trains


class Repeat(Dataset):
    """``n`` samples that are all the same pre-made example (no decoding cost: the loop's own overhead shows)."""

    def __init__(self, n: int, example) -> None:
        self.n, self.example = n, example

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self.example


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(model, batch, loss_fn, optimizer, device, steps: int, warmup: int) -> float:
    """Seconds per step of the textbook loop: autocast(bf16) forward and loss, backward, step."""
    for step in range(warmup + steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def project_loop(
    task: Task, measure: str, size: dict, sections: dict, device: torch.device, steps: int, warmup: int, workdir: Path
) -> float:
    """Seconds per step of ``slowmo.train.train_rank`` at world size 1, from the wall times it logs (each taken
    after reading the losses, i.e. after the GPU has finished those steps): ``measure``'s configuration
    (:data:`SPEC`), with ``sections`` on top."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    run_dir = workdir / f"loop_{time.monotonic_ns()}"
    composed = to_dict(
        config(SPEC[measure].split(), SPEC["models"][size["name"]][measure].split(), SPEC["loop"].split())
    )
    run = {
        "dist": {"backend": backend, "device": device.type, "world_size": 1},
        "logger": {"progress": False, "log_every": warmup},
        "train": {
            "max_steps": warmup + steps,
            "eval_every": 0,
            "precision": "bf16",
            "resume": "never",
            "signal_check_every": warmup + steps,
        },
        "run_dir": str(run_dir),
    }
    cfg = validate(OmegaConf.merge(composed, sections, run))  # (no other plug-in: the same tree)
    if backend == "nccl":
        comm = init_distributed("nccl", env=DistEnv(0, 1, 0, 1, "127.0.0.1", free_port(), "single"))
    else:
        comm = Single()
    try:
        train_rank(comm, cfg, run_dir, task=task)
    finally:
        if backend == "nccl":
            torch.distributed.destroy_process_group()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = {line["step"]: line["wall_time"] for line in lines}
    return (times[warmup + steps] - times[warmup]) / steps


def trained(measure: str, size: dict) -> Config:
    """The checked config of ``measure`` (images | translation) at ``size``: its lines of :data:`SPEC`."""
    return config(SPEC[measure].split(), SPEC["models"][size["name"]][measure].split())


def resnet(size: dict) -> torch.nn.Module:
    return build_model(trained("images", size).model, num_classes=1000, input_shape=(3, size["px"], size["px"]))


def images(size: dict, device: torch.device, workdir: Path) -> dict:
    px, n = size["px"], size["images"]
    torch.manual_seed(0)
    image, label = torch.randn(3, px, px), 3
    model = resnet(size).to(device, memory_format=torch.channels_last)
    batch = (
        torch.stack([image] * n).to(device, memory_format=torch.channels_last),
        torch.full((n,), label, device=device),
    )

    def loss(net, b):
        return torch.nn.functional.cross_entropy(net(b[0]), b[1])

    cfg = trained("images", size)
    base = OPTIMIZERS[cfg.optimizer.name].build(model.parameters(), cfg.optimizer)  # the project's base optimizer
    plain = plain_loop(model, batch, loss, base, device, size["steps"], size["warmup"])
    total = n * (size["warmup"] + size["steps"] + 1)
    loader = ImageData(eval_batch_size=n, num_workers=size["workers"], prefetch_factor=4, batch_size=n)
    task = classification(
        resnet(size), Repeat(total, (image, label)), Repeat(n, (image, label)), loader, TaskContext(0, 1, 0, workdir)
    )
    ours = project_loop(
        task,
        "images",
        size,
        {"data": {"batch_size": n, "num_workers": size["workers"], "prefetch_factor": 4}},
        device,
        size["steps"],
        size["warmup"],
        workdir,
    )
    return {
        "measure": f"{cfg.model.name} images/s ({px} px, batch {n}, bf16, channels-last)",
        "project_loop": n / ours,
        "plain_loop": n / plain,
        "ratio": plain / ours,
        "goal": 0.95,
    }


def transformer(size: dict, device: torch.device, workdir: Path) -> dict:
    pairs, length = size["pairs"], size["tokens"]
    torch.manual_seed(0)
    words = torch.randint(EOS + 1, VOCAB, (2, length - 1)).tolist()
    example = (words[0] + [EOS], words[1] + [EOS], "")
    cfg = trained("translation", size)
    model = Transformer(VOCAB, cfg.model.name, PAD).to(device)
    batch = data.to_device(collate([example] * pairs), device)

    def loss(net, b):
        return translation_loss(net, b, 0.1)

    base = OPTIMIZERS[cfg.optimizer.name].build(model.parameters(), cfg.optimizer)  # the project's base optimizer
    plain = plain_loop(model, batch, loss, base, device, size["steps"], size["warmup"])
    total = pairs * (size["warmup"] + size["steps"] + 1)

    def batches(epoch: int) -> list[list[int]]:
        return [list(range(i, i + pairs)) for i in range(0, total, pairs)]

    def eval_sums(net, b) -> torch.Tensor:
        return torch.stack(
            [translation_loss(net, b, 0.0).double(), torch.ones((), dtype=torch.float64, device=b["src"].device)]
        )

    task = Task(
        Transformer(VOCAB, cfg.model.name, PAD),
        Repeat(total, example),
        Repeat(pairs, example),
        collate,
        batches,
        loss,
        eval_sums,
        lambda sums: {"val_loss": float(sums[0] / sums[1])},
        main_metric="val_loss",
    )
    ours = project_loop(
        task,
        "translation",
        size,
        {"data": {"num_workers": size["workers"], "prefetch_factor": 4}},
        device,
        size["steps"],
        size["warmup"],
        workdir,
    )
    tokens = pairs * length  # target tokens per step, EOS included (fairseq's count)
    return {
        "measure": f"{cfg.model.name} target tokens/s ({pairs} x {length} tokens, bf16)",
        "project_loop": tokens / ours,
        "plain_loop": tokens / plain,
        "ratio": plain / ours,
        "goal": 0.95,
    }


def write_jpegs(root: Path, count: int, classes: int = 8) -> None:
    """``count`` 500x375 JPEGs (quality 90) of smooth random content, like photographs in size and entropy."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        noisy = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (375, 500, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)
    for c in range(classes):  # the task needs a val/ split with the same classes
        (root / "val" / f"class{c}").mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "train" / f"class{c}" / f"{c}.jpg", root / "val" / f"class{c}" / "0.jpg")


def pipeline(size: dict, device: torch.device, workdir: Path, model_images_per_s: float) -> dict:
    root = workdir / "imagefolder"
    write_jpegs(root, size["jpegs"])
    n, workers = size["images"], size["workers"]
    sections = {"data": {"root": str(root), "batch_size": n, "image_size": size["px"], "num_workers": workers}}
    cfg = validate(OmegaConf.merge(to_dict(trained("images", size)), sections))
    task = TASKS[cfg.task.name].build(cfg.task, cfg.data, cfg.model, TaskContext(0, 1, 0, workdir))
    sampler = data.EpochBatches(task.train_batches)
    loader = data.loader(data.Seeded(task.train_set, 0), sampler, task.collate, workers, 2, device.type == "cuda")
    warmup, timed, seen, epoch = 2, 0, 0, 0  # the first batches wait for the workers to start
    start = None
    while timed < size["steps"]:
        sampler.set_epoch(epoch)
        for _batch in data.on_device(loader, device):
            seen += 1
            if seen == warmup:
                _sync(device)
                start = time.perf_counter()
            elif seen > warmup:
                timed += 1
                if timed == size["steps"]:
                    break
        epoch += 1
    _sync(device)
    ips = n * timed / (time.perf_counter() - start)
    data.close(loader)
    return {
        "measure": f"input pipeline images/s ({workers} workers, 500x375 JPEGs -> {size['px']} px crops)",
        "project_loop": ips,
        "plain_loop": model_images_per_s,
        "ratio": ips / model_images_per_s,
        "goal": 1.0,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    args, machine = gpu_arguments(__doc__, "results/gpu_throughput", "toy sizes (a smoke run, e.g. on the CPU)", argv)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    name = "small" if args.small else "full"
    size = {**SIZES[name], "name": name}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        image_row = images(size, device, workdir)
        rows = [
            image_row,
            transformer(size, device, workdir),
            pipeline(size, device, workdir, image_row["project_loop"]),
        ]
    args.out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        row.update(met=row["ratio"] >= row["goal"], device=machine, torch=torch.__version__)
    with open(args.out / "throughput.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"GPU throughput on {machine} (torch {torch.__version__}), world size 1: `python benchmarks/gpu_throughput.py`",
        "",
        "| measure | project | reference | ratio | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['measure']} | {row['project_loop']:.1f} | {row['plain_loop']:.1f} | "
            f"{row['ratio']:.3f} | >= {row['goal']} | {'yes' if row['met'] else 'no'} |"
        )
    lines.append("")
    lines.append(
        "Reference: the plain loop for the model rows, the project loop's ResNet images/s for the pipeline row."
    )
    (args.out / "throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    record(args.out, __file__, argv)
    return rows


if __name__ == "__main__":
    main()
