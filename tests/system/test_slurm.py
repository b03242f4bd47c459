"""Against a real SLURM cluster: the local one of ``scripts/slurm/local_cluster.sh`` (slurmctld, slurmd, slurmdbd
with MariaDB, munge), brought up for this module and torn down after it (``.ci/run`` installs the packages).

- a 2-cell Hydra sweep through ``hydra/launcher=slurm`` (submitit), 2 gloo ranks per job, logged to W&B offline;
- preemption through the sweep launcher: SIGUSR1 mid-run, the ranks checkpoint, submitit requeues the job, and
  the requeued job ends with the same parameters as the sweep's uninterrupted cell;
- the same through ``sbatch scripts/slurm/run.sh`` (what the paper's ``*.sbatch`` files call): rank 0 requeues
  with ``scontrol requeue``.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "scripts/slurm/local_cluster.sh"
CELL = [
    "slowmo=on",
    "slowmo.tau=8",
    "slowmo.update.beta=0.6",
    "dist=gloo",
    "train.max_steps=600",
    "train.eval_every=200",
    "train.checkpoint_every=100",
    "logger.progress=false",
]
LAUNCHER = [
    "hydra/launcher=slurm",
    "hydra.launcher.tasks_per_node=2",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=20",
]


@pytest.fixture(scope="module")
def cluster():
    up = subprocess.run([str(CLUSTER), "up"], capture_output=True, text=True, timeout=900)
    assert up.returncode == 0, up.stdout + up.stderr
    yield
    subprocess.run(["scancel", "--user=root"], capture_output=True, timeout=60)
    down = subprocess.run([str(CLUSTER), "down"], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr


def sweep(sweep_dir: Path, *overrides: str) -> subprocess.Popen:
    """The README's sweep command, on digits."""
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "experiments/digits/train.py"),
            "-m",
            *overrides,
            *CELL,
            *LAUNCHER,
            f"hydra.sweep.dir={sweep_dir}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, WANDB_SILENT="true", WANDB_MODE="offline"),
    )


def final(run_dir: Path) -> dict:
    return torch.load(run_dir / "final.pt")["model"]


def wait_for_training(run_dir: Path, job: subprocess.Popen | None = None, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text()):
        assert job is None or job.poll() is None, job.stdout.read() if job else ""
        assert time.time() < deadline, f"{run_dir} never started training"
        time.sleep(0.05)


def sacct_states(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-D", "-j", job_id, "-o", "State"], capture_output=True, text=True)
    return out.stdout


@pytest.fixture(scope="module")
def swept(cluster, tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep")
    job = sweep(sweep_dir, "algorithm=localsgd,sgp", "logger=wandb")
    output, _ = job.communicate(timeout=900)
    assert job.returncode == 0, output[-4000:]
    return sweep_dir


def test_a_sweep_runs_one_slurm_job_per_cell(swept):
    summaries = sorted(swept.rglob("summary.json"))
    assert [p.parent.name.split(",")[0] for p in summaries] == ["algorithm=localsgd", "algorithm=sgp"]
    for path in summaries:
        run_dir = path.parent
        summary = json.loads(path.read_text())
        assert summary["status"] == "completed" and summary["steps"] == 600
        assert summary["world_size"] == 2  # two srun tasks found each other from SLURM's variables
        offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(offline) == 1
        record = offline[0].read_bytes()
        assert swept.name.encode() in record  # the W&B group: the sweep
        assert run_dir.name.encode() in record  # the W&B name: the cell's overrides
    job_dirs = [d for d in (swept / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", d.name)]
    assert len(job_dirs) == 2


def test_preemption_through_the_sweep_launcher_requeues_and_resumes_exactly(swept, tmp_path):
    job = sweep(tmp_path, "algorithm=sgp")
    deadline = time.time() + 300
    while not list(tmp_path.glob("*/metrics.jsonl")):
        assert job.poll() is None and time.time() < deadline, job.stdout.read() if job.poll() is not None else ""
        time.sleep(0.05)
    run_dir = next(tmp_path.glob("*/metrics.jsonl")).parent
    wait_for_training(run_dir)
    job_id = next(d.name for d in (tmp_path / ".submitit").iterdir() if list(d.glob("*_submitted.pkl")))
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=60)
    output, _ = job.communicate(timeout=900)
    assert job.returncode == 0, output[-4000:]
    logs = "".join(p.read_text() for p in (tmp_path / ".submitit" / job_id).glob("*_0_log.*"))
    assert re.search(r"preempted at step \d+: checkpoint written to .*; requeueing the job", logs), logs[-4000:]
    assert "resuming at step" in logs, logs[-4000:]
    assert "REQUEUE" in sacct_states(job_id.split("_")[0]) or "Requeued job" in logs
    reference = final(next(p.parent for p in swept.rglob("final.pt") if p.parent.name.startswith("algorithm=sgp")))
    resumed = final(run_dir)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_preemption_of_an_sbatch_job_requeues_and_resumes_exactly(swept, tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHON=sys.executable, RUN_DIR=str(run_dir))
    submitted = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--ntasks=2",
            "--cpus-per-task=1",
            "--mem=2G",
            "--signal=USR1@60",
            "--requeue",
            "--open-mode=append",
            f"--output={tmp_path}/slurm-%j.out",
            "scripts/slurm/run.sh",
            "digits",
            "algorithm=sgp",
            *CELL,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        check=True,
    )
    job_id = submitted.stdout.strip()
    wait_for_training(run_dir)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=60)
    deadline = time.time() + 600
    while "COMPLETED" not in sacct_states(job_id):
        states = sacct_states(job_id)
        assert time.time() < deadline and "FAILED" not in states, (tmp_path / f"slurm-{job_id}.out").read_text()
        time.sleep(1)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert re.search(r"preempted at step \d+: checkpoint written to .*; requeueing the job", log), log[-4000:]
    assert "restart 1" in log and "resuming at step" in log, log[-4000:]
    reference = final(next(p.parent for p in swept.rglob("final.pt") if p.parent.name.startswith("algorithm=sgp")))
    resumed = final(run_dir)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
