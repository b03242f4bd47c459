"""The table of bad inputs, shared by ``harness/test_bad_inputs.py`` (the simulated backend) and
``system/test_bad_inputs_on_gloo.py`` (real gloo processes): each fails with exactly one line that says what is wrong
and what to do, and nothing an earlier run already wrote into the run directory is lost.

Every case starts from a run directory that holds a finished run (2 ranks, MLP, Local SGD, a checkpoint at step 2)
and tries to run again in it with one thing wrong. The cases about the data, the model or the algorithm change what
the run computes, which the directory's run would refuse by itself: they carry ``train.overwrite=true``, so that the
case's own check speaks, and so that they show that even a run asked to discard the directory's run discards
nothing before it has passed every check. The cases about the directory's run itself carry no such key.
"""

import errno
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from slowmo.tasks.cifar10 import write_batches
from slowmo.train import checkpoint, run

from datasets import write_imagefolder, write_parallel


def _base(run_dir: Path) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir),
        "logger": {"progress": False},
        "train": {"max_steps": 2, "eval_every": 0, "checkpoint_every": 2},
        "dist": {"world_size": 2},
    }


def _merge(cfg: dict, sections: dict) -> dict:
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def finished_run(tmp_path_factory) -> Path:
    """The run directory every case starts from: a finished 2-rank run with a checkpoint at step 2."""
    run_dir = tmp_path_factory.mktemp("template") / "run"
    run(_base(run_dir))
    return run_dir


# ------------------------------------------------------------------------------------------- broken inputs
def _without(root: Path, *names: str) -> Path:
    for name in names:
        (root / "cifar-10-batches-py" / name).unlink()
    return root


def _cifar_missing(tmp: Path) -> dict:
    root = _without(write_batches(tmp / "c", 4), "data_batch_3", "test_batch")
    return {"task": {"name": "cifar10"}, "data": {"root": str(root), "verify_checksums": False}}


def _wmt(tmp: Path, **files: str) -> dict:
    root = write_parallel(tmp / "w")
    for name, text in files.items():
        (root / name.replace("_", ".")).write_text(text)
    return {"task": {"name": "wmt16"}, "data": {"root": str(root)}, "model": {"name": "transformer_tiny"}}


def _imagefolder_without_val_images(tmp: Path) -> dict:
    root = write_imagefolder(tmp / "i")
    for png in (root / "val").rglob("*.png"):
        png.unlink()
    return {"task": {"name": "imagenet"}, "data": {"root": str(root), "image_size": 32}, "model": {"name": "resnet50"}}


def _not_a_directory(tmp: Path) -> dict:
    (tmp / "file").write_text("")
    return {"run_dir": str(tmp / "file" / "run")}


def _busy_port(tmp: Path) -> dict:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    _busy_port.socket = sock  # held until the case is over
    return {"dist": {"backend": "gloo"}}


def _torchrun_env(monkeypatch, port: int | None = None, local: int = 1, world: int = 1) -> None:
    port = port or _busy_port.socket.getsockname()[1]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)


class _FullDisk:
    """A file that takes half of what is written to it, then reports a full disk."""

    def __init__(self, path, mode):
        self._file = open(path, mode)  # noqa: SIM115 - closed in __exit__

    def write(self, data):
        self._file.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()

    def __getattr__(self, name):
        return getattr(self._file, name)


def _full_disk(monkeypatch) -> None:
    monkeypatch.setattr(checkpoint, "open", _FullDisk, raising=False)


@dataclass
class Case:
    id: str
    sections: Callable[[Path], dict]
    message: str  # exact; {tmp} is the test's directory
    error: type = ValueError
    setup: Callable[..., None] = field(default=lambda monkeypatch: None)
    started: bool = False  # got past every check, so config.yaml now describes this attempt
    overwrite: bool = True  # attempt it with train.overwrite=true (see the module's docstring)
    gloo: bool = True  # attempted on real gloo processes too (not where the case picks its own backend)


def _clock(**changes) -> dict:
    """configs/dist/clock/equal.yaml's keys, some changed."""
    keys = dict(name="equal", step_ms=100.0, speeds=[1.0], straggle=0.0, slowdown=1.0, latency_ms=0.0, regions=1)
    return {**keys, "inside_gbps": None, "between_gbps": None, **changes}


SHARDED = "dist.replica_size=2 shards each replica's model with FSDP2 over torch.distributed"
ELASTIC = "dist=torchft runs Local SGD under SlowMo or a preset, the whole model averaged exactly (phase 1); "
CASES = [
    Case(
        "unknown key",
        lambda t: {"train": {"max_step": 3}},
        "bad config key 'train.max_step': Key 'max_step' not in 'TrainConfig'; did you mean train.max_steps?",
    ),
    Case(
        "wrong type",
        lambda t: {"train": {"max_steps": "many"}},
        "bad config key 'train.max_steps': Value 'many' of type 'str' could not be converted to Integer",
    ),
    Case("unknown top-level key (+foo=3)", lambda t: {"foo": 3}, "bad config key 'foo': Key 'foo' not in 'Config'"),
    Case(
        "a key of another algorithm",
        lambda t: {"algorithm": {"name": "sgp", "period": 3}},
        "bad config key 'algorithm.period': Key 'period' not in 'SGPConfig'",
    ),
    Case(
        "a data key of another task",
        lambda t: {"data": {"max_tokens": 64}},
        "bad config key 'data.max_tokens': Key 'max_tokens' not in 'DigitsData'",
    ),
    Case(
        "MNIST-1D validation share out of range",
        lambda t: {"task": {"name": "mnist1d"}, "data": {"val_fraction": 1.5}},
        "data.val_fraction=1.5 must be in (0, 1)",
    ),
    Case(
        "MNIST-1D generator seed numpy cannot take",
        lambda t: {"task": {"name": "mnist1d"}, "data": {"generator_seed": -1}},
        "data.generator_seed=-1 must be in [0, 2**32) (numpy's seeds)",
    ),
    Case(
        "unknown algorithm",
        lambda t: {"algorithm": {"name": "gossip"}},
        "algorithm.name='gossip' is not one of allreduce, localsgd, sgp, osgp",
    ),
    Case(
        "unknown backend",
        lambda t: {"dist": {"backend": "mpi"}},
        "dist.backend='mpi' is not one of simulated, gloo, nccl, torchft",
        gloo=False,
    ),
    Case(
        "gossip on elastic replicas",
        lambda t: {"dist": {"backend": "torchft"}, "slowmo": {"enabled": True}, "algorithm": {"name": "sgp"}},
        ELASTIC + "algorithm=sgp does not: it communicates at every inner step, and torchft's vote comes once per "
        "outer step",
        gloo=False,
    ),
    Case(
        "a compressed mean on elastic replicas",
        lambda t: {"dist": {"backend": "torchft"}, "slowmo": {"enabled": True, "mean": {"name": "compressed"}}},
        ELASTIC + "the compressed mean's all-to-all and error-feedback residuals assume a fixed set of ranks",
        gloo=False,
    ),
    Case(
        "a virtual clock on real processes",
        lambda t: {"dist": {"backend": "gloo", "clock": _clock()}},
        "dist/clock=equal is the simulator's virtual time: use dist=simulated (dist=gloo runs in real time)",
        gloo=False,
    ),
    Case(
        "a virtual clock's regions that do not divide the ranks",
        lambda t: {"dist": {"clock": _clock(regions=3)}},
        "dist.clock.regions=3 does not divide the dist.world_size=2 ranks into equal regions",
        gloo=False,
    ),
    Case(
        "a virtual clock with a bandwidth matrix of another size",
        lambda t: {"dist": {"clock": _clock(regions=2, between_gbps=[[1.0]])}},
        "dist.clock.between_gbps must be one number or a 2 x 2 matrix (dist.clock.regions), got [[1.0]]",
        gloo=False,
    ),
    Case(
        "the outer state on an unknown device",
        lambda t: {"slowmo": {"enabled": True, "state_device": "gpu"}},
        "slowmo.state_device must be null (the outer state with the model) or cpu (in host memory), got 'gpu'",
    ),
    Case(
        "sharded replicas on the simulator",
        lambda t: {"dist": {"replica_size": 2}},
        SHARDED + ": use dist=gloo or dist=nccl, not dist=simulated",
        gloo=False,
    ),
    Case(
        "a sharded outer state on sharded replicas",
        lambda t: {
            "dist": {"backend": "gloo", "replica_size": 2},
            "slowmo": {"enabled": True, "mean": {"name": "sharded"}},
        },
        SHARDED + "; each rank already keeps only its shard's outer state, 1/k of it (use slowmo/mean=exact)",
    ),
    Case(
        "a warm-up on sharded replicas",
        lambda t: {"dist": {"backend": "gloo", "replica_size": 2}, "algorithm": {"warmup_steps": 2}},
        SHARDED + "; algorithm=localsgd does not run on it: the warm-up averages the gradients across replicas at "
        "every inner step (set algorithm.warmup_steps=0)",
    ),
    Case(
        "replicas that do not divide the world",
        lambda t: {"dist": {"backend": "gloo", "replica_size": 3}},
        "dist.replica_size=3: the 2 ranks are not a whole number of replicas of 3 ranks; launch a multiple of 3 ranks "
        "(a replica is k consecutive ranks: with torchrun or SLURM, one node's)",
    ),
    Case(
        "an elastic run that does not end on an outer step",
        lambda t: {"dist": {"backend": "torchft"}, "slowmo": {"enabled": True, "tau": 3}},
        "dist=torchft ends on an outer step (every replica then holds x_T,0): set train.max_steps to a multiple of "
        "slowmo.tau = 3, got 2",
        gloo=False,
    ),
    Case(
        "elastic replicas on a GPU",
        lambda t: {"dist": {"backend": "torchft", "device": "cuda"}, "slowmo": {"enabled": True, "tau": 2}},
        ELASTIC + "on the CPU, over torchft's gloo process group (set dist.device=cpu or auto)",
        gloo=False,
    ),
    Case(
        "an elastic replica without its lighthouse",
        lambda t: {"dist": {"backend": "torchft", "replica_id": 1}, "slowmo": {"enabled": True, "tau": 2}},
        "replica 1 of a dist=torchft job needs its lighthouse: set dist.lighthouse=<host:port> or $TORCHFT_LIGHTHOUSE",
        gloo=False,
    ),
    Case("no steps", lambda t: {"train": {"max_steps": 0}}, "train.max_steps must be >= 1, got 0"),
    Case("a batch of 0", lambda t: {"data": {"batch_size": 0}}, "data.batch_size must be >= 1, got 0"),
    Case(
        "an evaluation batch of 0",
        lambda t: {"data": {"eval_batch_size": 0}},
        "data.eval_batch_size must be >= 1, got 0",
    ),
    Case("logging every 0 steps", lambda t: {"logger": {"log_every": 0}}, "logger.log_every must be >= 1, got 0"),
    Case(
        "a Local SGD period of 0",
        lambda t: {"algorithm": {"name": "localsgd", "period": 0}},
        "algorithm.period must be >= 1, got 0",
    ),
    Case(
        "preset of another task",
        lambda t: {"experiment": "paper_imagenet", "task": {"name": "digits"}},
        "+experiment=paper_imagenet is the preset of task imagenet, but the task is digits; "
        "run experiments/imagenet/train.py",
    ),
    Case(
        "tau=0",
        lambda t: {"slowmo": {"enabled": True, "tau": 0}},
        "slowmo.tau must be >= 1, got 0",
    ),
    Case(
        "a negative lr",
        lambda t: {"optimizer": {"lr": -0.1}},
        "optimizer.lr must be > 0 (the base learning rate gamma, before the schedule), got -0.1",
    ),
    Case("momentum 1", lambda t: {"optimizer": {"momentum": 1.0}}, "optimizer.momentum must be in [0, 1), got 1.0"),
    Case(
        "Nesterov without momentum",
        lambda t: {"optimizer": {"momentum": 0.0, "nesterov": True}},
        "optimizer.nesterov=true needs optimizer.momentum > 0 (e.g. 0.9), or set nesterov=false",
    ),
    Case(
        "Adam with one beta",
        lambda t: {"optimizer": {"name": "adam", "betas": [0.9]}},
        "optimizer.betas must be two numbers in [0, 1), e.g. [0.9, 0.999], got [0.9]",
    ),
    Case(
        "a schedule that multiplies the lr by 0",
        lambda t: {"schedule": {"name": "step", "gamma": 0.0}},
        "schedule.gamma must be > 0 (the lr's factor at each milestone), got 0.0",
    ),
    Case(
        "beta=1",
        lambda t: {"slowmo": {"enabled": True, "update": {"beta": 1.0}}},
        "beta must be in [0, 1) (slow momentum; the paper tunes it in 0.4-0.8), got 1.0",
    ),
    Case(
        "alpha<0",
        lambda t: {"slowmo": {"enabled": True, "update": {"alpha": -1.0}}},
        "alpha must be a finite number > 0 (slow learning rate; the paper uses 1.0), got -1.0",
    ),
    Case(
        "SGP on one rank",
        lambda t: {"algorithm": {"name": "sgp"}, "dist": {"world_size": 1}},
        "SGP gossips between ranks and needs at least 2, got 1; use LocalSGD or AllReduce on a single rank",
    ),
    Case(
        "world not divisible by procs_per_node",
        lambda t: {"algorithm": {"name": "osgp", "procs_per_node": 3}, "dist": {"world_size": 4}},
        "world size 4 is not divisible by algorithm.procs_per_node=3",
    ),
    Case(
        "batch larger than the data",
        lambda t: {"data": {"batch_size": 4096}},
        "the training set gives no full batch to each of 2 ranks; lower data.batch_size (or data.max_tokens) "
        "or the number of ranks",
    ),
    Case(
        "missing data.root",
        lambda t: {"task": {"name": "cifar10"}},
        "task cifar10 needs data.root: the directory holding cifar-10-batches-py/ (add data.download=true to fetch "
        "it when online)",
    ),
    Case(
        "CIFAR batches missing",
        _cifar_missing,
        "CIFAR-10 files missing under {tmp}/c/cifar-10-batches-py: data_batch_3, test_batch; point data.root at the "
        "directory holding cifar-10-batches-py/ or add data.download=true (files written by hand, not the official "
        "batches, need data.verify_checksums=false)",
    ),
    Case(
        "CIFAR batches that fail the checksum",
        lambda t: {"task": {"name": "cifar10"}, "data": {"root": str(write_batches(t / "c", 4))}},
        "CIFAR-10 files under {tmp}/c/cifar-10-batches-py fail torchvision's MD5 check: data_batch_1, data_batch_2, "
        "data_batch_3, data_batch_4, data_batch_5, test_batch, batches.meta; download the official batches again "
        "(data.download=true fetches them) (files written by hand, not the official batches, need "
        "data.verify_checksums=false)",
    ),
    Case(
        "ImageNet split missing",
        lambda t: {"task": {"name": "imagenet"}, "data": {"root": str(t / "nowhere")}},
        "ImageNet split missing: {tmp}/nowhere/train is not a directory; data.root must hold train/ and val/ with "
        "one sub-directory of images per class",
    ),
    Case(
        "ImageFolder without images",
        _imagefolder_without_val_images,
        "no images under {tmp}/i/val (Found no valid file for the classes cat, dog. Supported extensions are: .jpg, "
        ".jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp); data.root must hold train/ and val/ with one "
        "sub-directory of images per class",
    ),
    Case(
        "WMT line counts differ",
        lambda t: _wmt(t, train_de="nur eine zeile\n"),
        "train.en has 64 lines but train.de has 1 under {tmp}/w; parallel files must align line by line",
    ),
    Case(
        "empty sentencepiece corpus",
        lambda t: _wmt(t, train_en="\n" * 64, train_de="\n" * 64),
        "the training text is empty: sentencepiece has nothing to learn from; check train.en/train.de",
    ),
    Case(
        "WMT without a Transformer",
        lambda t: {**_wmt(t), "model": {"name": "mlp"}},
        "task wmt16 needs a Transformer: model.name is 'mlp', use one of transformer_wmt_en_de, "
        "transformer_wmt_en_de_big, transformer_tiny",
    ),
    Case(
        "a run directory holding a run with another model",
        lambda t: {"model": {"name": "cnn"}},
        "run directory {tmp}/run holds another run (model.name: mlp there, cnn here); resume it with its own "
        "settings, run this one in another directory (hydra.run.dir= or run_dir=), or add train.overwrite=true to "
        "discard it",
        overwrite=False,
    ),
    Case(
        "a run directory holding a run with another algorithm and seed",
        lambda t: {"algorithm": {"name": "sgp"}, "seed": 3},
        "run directory {tmp}/run holds another run (algorithm.name: localsgd there, sgp here; seed: 0 there, 3 here); "
        "resume it with its own settings, run this one in another directory (hydra.run.dir= or run_dir=), or add "
        "train.overwrite=true to discard it",
        overwrite=False,
    ),
    Case(
        "a run directory holding a run of another world size",
        lambda t: {"dist": {"world_size": 4}},
        "run directory {tmp}/run holds another run (dist.world_size: 2 there, 4 here); resume it with its own "
        "settings, run this one in another directory (hydra.run.dir= or run_dir=), or add train.overwrite=true to "
        "discard it",
        overwrite=False,
    ),
    Case(
        "a run directory holding a longer run",
        lambda t: {"train": {"max_steps": 1}},
        "run directory {tmp}/run holds a run that reached step 2, beyond train.max_steps=1; raise train.max_steps "
        "to 2 or more, run this one in another directory (hydra.run.dir= or run_dir=), or add train.overwrite=true "
        "to discard it",
        overwrite=False,
    ),
    Case(
        "a run directory holding a run, under train.resume=never",
        lambda t: {"train": {"resume": "never", "max_steps": 4}},
        "run directory {tmp}/run holds a run and train.resume=never; resume it (train.resume=auto), run this one in "
        "another directory (hydra.run.dir= or run_dir=), or add train.overwrite=true to discard it",
        overwrite=False,
    ),
    Case(
        "run dir not writable",
        _not_a_directory,
        "run directory {tmp}/file/run is not writable (Not a directory); set hydra.run.dir (or run_dir) to a "
        "writable path",
    ),
    Case(
        "disk full on checkpoint write",
        lambda t: {"train": {"max_steps": 4}},
        "rank 0: cannot write checkpoint {tmp}/run/checkpoints/step_4 (No space left on device); free space or fix "
        "permissions, then resume: the previous checkpoint is still valid",
        OSError,
        _full_disk,
        started=True,
        overwrite=False,
        gloo=False,  # the full disk is a patch of this process's file writes, which other processes do not see
    ),
    Case(
        "master port in use",
        _busy_port,
        "port {port} on 127.0.0.1 is already in use, and rank 0 must host the rendezvous there; set MASTER_PORT "
        "to a free port",
        setup=_torchrun_env,
        gloo=False,
    ),
    Case(
        "procs_per_node above the processes per node",
        lambda t: {"algorithm": {"procs_per_node": 4}, "dist": {"backend": "gloo"}},
        "algorithm.procs_per_node=4 is larger than the 2 processes started on this node; set it to at most 2",
        setup=lambda monkeypatch: _torchrun_env(monkeypatch, port=1, local=2, world=4),
        gloo=False,
    ),
    Case(
        "dist.device=cuda without a GPU",
        lambda t: {"dist": {"device": "cuda"}},
        "dist.device=cuda needs a CUDA GPU and none is visible (torch.cuda.is_available() is False); use "
        "dist.device=cpu",
        setup=lambda monkeypatch: monkeypatch.setattr("torch.cuda.is_available", lambda: False),
    ),
    Case(
        "nccl on the CPU",
        lambda t: {"dist": {"backend": "nccl", "device": "cpu"}},
        "dist.backend=nccl moves only GPU tensors but dist.device=cpu; use dist.device=cuda (or auto), or "
        "dist.backend=gloo to train on the CPU",
        gloo=False,
    ),
    Case(
        "negative data.num_workers",
        lambda t: {"data": {"num_workers": -1}},
        "data.num_workers must be >= 0 (0 loads batches on the training thread), got -1",
    ),
    Case(
        "unknown precision",
        lambda t: {"train": {"precision": "fp8"}},
        "train.precision='fp8' is not one of fp32, bf16, fp16",
    ),
    Case(
        "an unknown codec",
        lambda t: {"slowmo": {"enabled": True, "mean": {"name": "compressed", "codec": "int4"}}},
        "codec must be one of fp16, bf16, int8, fp8, fp4, got 'int4'",
    ),
    Case(
        "error feedback without a codec",
        lambda t: {"slowmo": {"enabled": True, "mean": {"name": "eager", "codec": "none", "error_feedback": True}}},
        "error_feedback needs a codec (int8, fp8, fp4, fp16 or bf16): with none there is no error",
    ),
    Case(
        "an option the outer optimizer does not take",
        lambda t: {
            "slowmo": {"enabled": True, "update": {"name": "torch", "optimizer": "SGD", "options": {"betas": [0.9]}}}
        },
        "the outer SGD refuses its options {{'betas': [0.9]}}: SGD.__init__() got an unexpected keyword argument "
        "'betas'",
    ),
    Case(
        "outer Nesterov without momentum",
        lambda t: {
            "slowmo": {"enabled": True, "update": {"name": "torch", "optimizer": "SGD", "options": {"nesterov": True}}}
        },
        "the outer SGD refuses its options {{'nesterov': True}}: Nesterov momentum requires a momentum and zero "
        "dampening",
    ),
    Case(
        "an outer optimizer that does not exist",
        lambda t: {"slowmo": {"enabled": True, "update": {"name": "torch", "optimizer": "Adamm", "options": {}}}},
        "outer optimizer 'Adamm' is not a torch.optim.Optimizer class; give one of torch.optim's (SGD, Adam, AdamW, "
        "RAdam, ...) or a dotted path to your own",
    ),
    Case(
        "slow momentum's beta given to a torch update",
        lambda t: {"slowmo": {"enabled": True, "update": {"name": "torch", "optimizer": "Adam", "beta": 0.9}}},
        "slowmo.update.beta is slow momentum's knob: the outer torch optimizer takes its own in slowmo.update.options "
        "(a preset that set it for slow momentum: drop it with ~slowmo.update.beta)",
    ),
    Case(
        "fragments that do not divide tau",
        lambda t: {"slowmo": {"enabled": True, "tau": 12, "fragments": {"count": 5}}},
        "fragments.count must be an integer >= 1 that divides tau = 12, got 5",
    ),
    Case(
        "eager updates with streaming fragments",
        lambda t: {"slowmo": {"enabled": True, "mean": {"name": "eager"}, "fragments": {"count": 2}}},
        "eager updates delay the whole mean by a round, streaming fragments each fragment's by fragments.delay "
        "steps: use one delay or the other (with eager: one fragment, no delay, no mix)",
    ),
    Case(
        "a sharded outer state with streaming fragments",
        lambda t: {"slowmo": {"enabled": True, "mean": {"name": "sharded"}, "fragments": {"count": 2}}},
        "a sharded outer state keeps 1/m of every parameter's outer state per rank and a streaming fragment whole "
        "layers: they do not combine (set fragments to one, no delay, no mix, or slowmo/mean=exact)",
    ),
    *[
        Case(f"the key slowmo.{key} of before the parts", lambda t, key=key, v=v: {"slowmo": {key: v}}, message)
        for key, v, message in (
            (
                "compression",
                "int8",
                "slowmo.compression is now the mean: slowmo/mean=compressed slowmo.mean.codec=<codec>",
            ),
            (
                "outer_optimizer",
                "adam",
                "slowmo.outer_optimizer is now the update: slowmo/update=nesterov, adam or "
                "torch (slowmo.update.optimizer, slowmo.update.options)",
            ),
            ("sync_delay", 2, "slowmo.sync_delay is now slowmo.fragments.delay"),
            (
                "shard_outer_state",
                True,
                "slowmo.shard_outer_state is now the mean: slowmo/mean=sharded (the exact mean, 1/m of the outer "
                "state per rank)",
            ),
            ("fragments", 4, "slowmo.fragments is now a section: slowmo.fragments.count=<P> (and .delay, .mix)"),
        )
    ],
    Case(
        "gradient clipping at a norm <= 0",
        lambda t: {"train": {"clip_grad_norm": 0.0}},
        "train.clip_grad_norm must be > 0 or null (no clipping), got 0.0",
    ),
    Case(
        "procs_per_node above the GPUs",
        lambda t: {"algorithm": {"procs_per_node": 2}, "dist": {"backend": "nccl"}},
        "2 processes per node need 2 GPUs, this node has 0; lower algorithm.procs_per_node (and the processes "
        "started per node) to at most the GPUs per node",
        gloo=False,
    ),
]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def attempt(case: Case, backend: str, finished_run: Path, tmp_path: Path, monkeypatch) -> None:
    """Run ``case`` on ``backend`` ("default", or "gloo") in a copy of ``finished_run``: its exact one line, and every
    file of the finished run as it was."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = _snapshot(run_dir)
    cfg = _merge(_base(run_dir), case.sections(tmp_path))
    cfg = _merge(
        cfg, {"train": {"overwrite": case.overwrite}, **({"dist": {"backend": "gloo"}} if backend == "gloo" else {})}
    )
    case.setup(monkeypatch)
    with pytest.raises(case.error) as info:
        run(cfg)
    port = getattr(_busy_port, "socket", None)
    expected = case.message.format(tmp=tmp_path, port=port.getsockname()[1] if port else None)
    assert str(info.value) == expected
    monkeypatch.undo()
    after = _snapshot(run_dir)
    for name, content in before.items():
        if name in ("config.yaml", "summary.json") and case.started:  # (an attempt that started records itself)
            continue
        assert after.get(name) == content, f"{name} was changed or lost"
    assert not list(run_dir.rglob(".*.tmp")), "a partial file was left behind"
    if port:
        port.close()
        del _busy_port.socket
