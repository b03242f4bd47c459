"""A new base algorithm is one Python module plus one YAML file, and nothing else: this test writes a throw-away
algorithm into a plug-in directory of its own (``<dir>/slowmo/algorithms/halfway.py``, found through ``PYTHONPATH``
by the package's ``extend_path``) and its config (``<dir>/configs/algorithm/halfway.yaml``, found through
``hydra.searchpath``), then trains with it from the command line on 2 gloo processes, checkpoints, resumes
bit-exactly, and draws the table and figures of ``scripts/plot.py``, which name it by its registered label."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]

ALGORITHM = '''
"""Half-way averaging: every `every` steps each rank moves half-way to the mean of the parameters."""

from dataclasses import dataclass

from slowmo.algorithms.base import ALGORITHMS, Algorithm, AlgorithmConfig


@dataclass
class HalfwayConfig(AlgorithmConfig):
    every: int


@ALGORITHMS.register("halfway", HalfwayConfig, label="Half-way SGD")
class Halfway(Algorithm):
    def __init__(self, comm, every, procs_per_node=1):
        super().__init__(comm, procs_per_node)
        self.every = every

    def after_step(self, step, outer):
        if (step + 1) % self.every == 0:
            for p in self.params:
                mean = p.detach().clone()
                self.comm.all_reduce(mean, "mean")
                p.detach().add_(mean).mul_(0.5)
'''

CONFIG = """
# Half-way averaging (a test's throw-away algorithm).
name: halfway
every: 2
"""


def cli(plugins: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(plugins), str(ROOT)]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def test_a_new_algorithm_is_one_module_and_one_yaml_file(tmp_path):
    plugins, configs = tmp_path / "plugins", tmp_path / "configs"
    (plugins / "slowmo" / "algorithms").mkdir(parents=True)
    (plugins / "slowmo" / "algorithms" / "halfway.py").write_text(textwrap.dedent(ALGORITHM))
    (configs / "algorithm").mkdir(parents=True)
    (configs / "algorithm" / "halfway.yaml").write_text(CONFIG)
    train = [
        str(ROOT / "experiments/digits/train.py"),
        "algorithm=halfway",
        "slowmo=on",
        "slowmo.tau=4",
        "dist=gloo",
        "dist.world_size=2",
        "train.eval_every=4",
        "train.checkpoint_every=4",
        "logger.progress=false",
        f"hydra.searchpath=[file://{configs}]",
    ]
    for name, steps in (("straight", 12), ("resumed", 8), ("resumed", 12)):
        out = cli(plugins, *train, f"train.max_steps={steps}", f"hydra.run.dir={tmp_path / 'runs' / name}")
        assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming from " in out.stderr
    a, b = (torch.load(tmp_path / "runs" / name / "final.pt")["model"] for name in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    recorded = yaml.safe_load((tmp_path / "runs" / "straight" / "config.yaml").read_text())
    assert recorded["algorithm"] == {"name": "halfway", "procs_per_node": 1, "every": 2}
    out = cli(plugins, str(ROOT / "scripts/plot.py"), str(tmp_path / "runs"), "--out", str(tmp_path / "fig"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| Half-way SGD + SlowMo | 2 | 12 |" in (tmp_path / "fig" / "table.md").read_text()
    assert (tmp_path / "fig" / "curves_epoch.png").read_bytes()[:4] == b"\x89PNG"
    out = cli(plugins, *train, "algorithm.every=0.5", f"hydra.run.dir={tmp_path / 'runs' / 'bad'}")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "error: bad config key 'algorithm.every': Value '0.5' of type 'float' could not be converted to Integer"
    )
