"""The command line as a user meets it (real processes): a mistake is one line and exit 2, whether Hydra, the config or
a rank of a gloo run finds it; a multirun sweep; the plot script."""

import subprocess
import sys

from slowmo.train import run

from command_line import ROOT, command


def _cli(*args):
    return subprocess.run(command(*args, backend="simulated"), capture_output=True, text=True, timeout=300)


def test_the_command_line_prints_the_one_line_and_exits_2(tmp_path):
    out = _cli("slowmo=on", "slowmo.update.beta=1.0", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: beta must be in [0, 1) (slow momentum; the paper tunes it in 0.4-0.8), got 1.0"
    ]


def test_the_command_line_is_one_line_and_exit_2_for_hydra_and_for_a_rank(tmp_path):
    out = subprocess.run(command("slowmo=true"), capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stderr.splitlines()) == (
        2,
        ["error: slowmo=true: slowmo is a config group; choose one of bmuf, diloco, lookahead, off, on"],
    )
    # raised inside the gloo ranks (the task's data check): printed once, by the launcher
    args = ("task=cifar10", f"data.root={tmp_path}", "model=resnet20", f"hydra.run.dir={tmp_path / 'run'}")
    out = subprocess.run(command(*args), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines()[1:] == [
        f"error: CIFAR-10 files missing under {tmp_path}/cifar-10-batches-py: data_batch_1, data_batch_2, "
        "data_batch_3, data_batch_4, data_batch_5, test_batch, batches.meta; point data.root at the directory holding "
        "cifar-10-batches-py/ or add data.download=true (files written by hand, not the official batches, need "
        "data.verify_checksums=false)"
    ]


def test_a_hydra_multirun_sweep(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments/digits/train.py"),
            "-m",
            "algorithm=localsgd,sgp",
            "slowmo=off,on",
            "train.max_steps=12",
            "train.eval_every=0",
            "logger.progress=false",
            f"hydra.sweep.dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summaries = sorted(tmp_path.rglob("summary.json"))
    assert len(summaries) == 4
    names = {p.parent.name for p in summaries}
    assert "algorithm=sgp,slowmo=on,train.eval_every=0,train.max_steps=12" in names
    assert out.stdout.splitlines()[-1] == (  # the sweep's last line: where it is, and how to compare its cells
        f"sweep done: its runs are in {tmp_path}; compare them with: python scripts/plot.py {tmp_path} --out "
        f"{tmp_path}/plots"
    )


def test_the_plot_script_draws_figures_and_a_table(tmp_path):
    for name, enabled in (("a", False), ("b", True)):
        for seed in (0, 1):
            run(
                {
                    "run_dir": str(tmp_path / f"{name}{seed}"),
                    "seed": seed,
                    "slowmo": {"enabled": enabled, "tau": 4},
                    "train": {"max_steps": 8, "eval_every": 4},
                    "dist": {"world_size": 4},
                    "data": {"batch_size": 16},
                    "optimizer": {"lr": 0.05},
                    "logger": {"progress": False, "log_every": 5},
                }
            )
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/plot.py"), str(tmp_path), "--out", str(tmp_path / "fig")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "fig" / "table.md").read_text()
    assert "| Local SGD | 2 | 8 |" in table and "| Local SGD + SlowMo | 2 | 8 |" in table
    for png in ("curves_epoch.png", "curves_time.png"):
        assert (tmp_path / "fig" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_refused_command_leaves_no_directory_behind(tmp_path):
    """Hydra makes the run directory before the run's checks: a refused command takes it (and the empty parents it
    made) away again, so nothing lies beside the real runs; a directory that was there stays."""
    kept = tmp_path / "kept"
    kept.mkdir()
    for run_dir in (tmp_path / "runs" / "new", kept):
        out = subprocess.run(command("optimizer.lr=-0.1", f"hydra.run.dir={run_dir}"), capture_output=True, text=True)
        assert (out.returncode, out.stderr.splitlines()) == (
            2,
            ["error: optimizer.lr must be > 0 (the base learning rate gamma, before the schedule), got -0.1"],
        )
        assert sorted(tmp_path.rglob("*")) == [kept]


def test_help_gives_every_key_of_the_config_with_its_meaning():
    train = str(ROOT / "experiments/digits/train.py")
    out = subprocess.run(
        [sys.executable, train, "--help", "algorithm=sgp", "dist.world_size=2"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    keys = [line.strip() for line in out.stdout.splitlines() if line.startswith("  ") and "=" in line.split()[0]]
    lr = next(key for key in keys if key.startswith("optimizer.lr="))  # what it is, then why digits set it so
    assert lr.startswith("optimizer.lr=0.05  # gamma before the schedule's factor (at 0.1 (the optimizer's default)")
    assert "algorithm.graph=directed_exponential  # a registered gossip graph (slowmo.graphs), over the nodes" in keys
    assert "dist.world_size=2  # ranks to simulate or spawn locally (torchrun/srun: the job's, recorded)" in keys
    assert all("  # " in key for key in keys), [key for key in keys if "  # " not in key]  # every key explained
    assert "  slowmo: bmuf, diloco, lookahead, off, on" in out.stdout.splitlines()
