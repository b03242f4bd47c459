"""kill -9 one rank of a 4-process torchrun job (gloo, 127.0.0.1) at a random step: the restarted run resumes from
the last complete checkpoint and its ``final.pt`` is bit-identical to an uninterrupted run's with the same seed (run
by the local launcher: the same gloo processes, started another way).

The restart is done by hand (a second ``torchrun`` with ``train.resume=auto``, the default) or by torchrun itself
(``--max-restarts=1``). Each case takes about 45 s here: the torchrun processes' start dominates.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slowmo.tasks.cifar10 import write_batches
from slowmo.train import compose, run, validate

ROOT = Path(__file__).resolve().parents[2]
COMMON = [
    "dist.backend=gloo",
    "dist.timeout_s=20",
    "train.max_steps=120",  # the kill comes within ~0.6 s of the first checkpoint, step 10: ~20 steps
    "train.checkpoint_every=10",
    "train.eval_every=100",
    "data.batch_size=16",
    "logger.progress=false",
    "slowmo=on",
    "slowmo.tau=8",
    "slowmo.update.beta=0.6",
]
CASES = {  # name: (task, processes, overrides)
    "localsgd": ("digits", 4, ["algorithm=localsgd", "algorithm.period=4"]),
    "osgp": ("digits", 4, ["algorithm=osgp"]),
    # 2 replicas of 2 ranks sharding the model with FSDP2: each rank's file holds its shards; the outer state in
    # buffers of its own (host memory, on a GPU)
    "sharded replicas": (
        "digits",
        4,
        ["algorithm=localsgd", "algorithm.period=4", "dist.replica_size=2", "slowmo.state_device=cpu"],
    ),
    # augmentation on, batches loaded by 2 worker processes per rank, across epoch boundaries (5 steps per epoch)
    "cifar10 with workers": (
        "cifar10",
        2,
        [
            "algorithm=localsgd",
            "algorithm.period=4",
            "model=resnet20",
            "model.width=4",
            "data.batch_size=8",
            "data.num_workers=2",
            "data.verify_checksums=false",
            "data.root={cifar}",
        ],
    ),
}
# the same on one GPU shared by the 2 ranks (gloo on CUDA tensors), channels-last, with deterministic kernels
CASES["cifar10 on cuda"] = (
    *CASES["cifar10 with workers"][:2],
    [*CASES["cifar10 with workers"][2], "dist.device=cuda", "train.deterministic=true"],
)
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA GPU on this machine (scripts/gpu_check.sh runs these where there is one)",
)


DATA: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def cifar_files(tmp_path_factory):
    DATA["cifar"] = write_batches(tmp_path_factory.mktemp("cifar"), 16)


def torchrun(run_dir: Path, case: str, restarts: int = 0) -> subprocess.Popen:
    task, processes, overrides = CASES[case]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        f"--max-restarts={restarts}",
        "--monitor-interval=0.2",
        str(ROOT / f"experiments/{task}/train.py"),
        *COMMON,
        *(o.format(**DATA) for o in overrides),
        f"hydra.run.dir={run_dir}",
    ]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1")
    )


def workers(pid: int) -> list[int]:
    """The rank processes torchrun started (its children)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children


def processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def kill_one_rank_mid_run(job: subprocess.Popen, run_dir: Path, rng: random.Random) -> str:
    """Once the first checkpoint is complete, wait a random moment and SIGKILL a random rank."""
    deadline = time.time() + 240
    while not list(run_dir.glob("checkpoints/step_*/COMPLETE")):
        assert job.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.6))
    victim = rng.choice(workers(job.pid))
    newest = max(int(d.name[5:]) for d in run_dir.glob("checkpoints/step_*"))
    os.kill(victim, signal.SIGKILL)
    return f"killed pid {victim} after checkpoint step_{newest}"


def finish(job: subprocess.Popen) -> tuple[int, str]:
    output, _ = job.communicate(timeout=300)
    return job.returncode, output


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same run, never stopped, by the local launcher (gloo processes from its warm fork server): a resumed
    torchrun job must end bit-identical to it."""
    cache = {}

    def get(algorithm):
        if algorithm not in cache:
            task, processes, overrides = CASES[algorithm]
            run_dir = tmp_path_factory.mktemp("straight") / algorithm
            settings = [*COMMON, *(o.format(**DATA) for o in overrides), f"dist.world_size={processes}"]
            run(validate(compose([*settings, f"run_dir={run_dir}"], config_name=f"train_{task}")))
            cache[algorithm] = torch.load(run_dir / "final.pt")["model"]
        return cache[algorithm]

    return get


@pytest.mark.parametrize(
    "algorithm,restart",
    [
        # SGP's state is OSGP's without the message in flight: its bit-exact resume is tests/engine/test_state.py's
        ("localsgd", "by hand"),
        ("osgp", "by torchrun"),
        ("sharded replicas", "by hand"),
        ("cifar10 with workers", "by hand"),
        pytest.param("cifar10 on cuda", "by hand", marks=[pytest.mark.gpu, needs_cuda]),
    ],
)
def test_kill_9_and_resume_bit_exactly(tmp_path, algorithm, restart, uninterrupted):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    job = torchrun(run_dir, algorithm, restarts=1 if restart == "by torchrun" else 0)
    what = kill_one_rank_mid_run(job, run_dir, rng)
    code, output = finish(job)
    context = f"seed {seed}, {what}\n{output[-3000:]}"
    if restart == "by hand":
        assert code != 0, context
        assert not (run_dir / "final.pt").exists(), context
        assert "exitcode  : -9" in output, context  # torchrun names the killed rank
        assert processes_mentioning(str(run_dir)) == [], context  # no orphan left behind
        code, output = finish(torchrun(run_dir, algorithm))
        context = f"seed {seed}, {what}\n{output[-3000:]}"
    assert code == 0, context
    assert "resuming at step " in output, context
    resumed = torch.load(run_dir / "final.pt")["model"]
    straight = uninterrupted(algorithm)
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight), context
