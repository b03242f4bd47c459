"""A new base algorithm, or a new part of the outer step, is one Python module plus one YAML file, and nothing else:
this test writes a throw-away algorithm into a plug-in directory of its own (``<dir>/slowmo/algorithms/halfway.py``,
found through ``PYTHONPATH`` by the package's ``extend_path``) and its config (``<dir>/configs/algorithm/halfway.yaml``,
found through ``hydra.searchpath``), then trains with it from the command line on 2 gloo processes, checkpoints,
resumes bit-exactly, and draws the table and figures of ``scripts/plot.py``, which name it by its registered label;
and likewise an outer update (``<dir>/slowmo/outer/sign.py``, ``<dir>/configs/slowmo/update/sign.yaml``), whose
refusal of a sharded state is the run's one-line error."""

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
    assert "resuming at step " in out.stderr
    a, b = (torch.load(tmp_path / "runs" / name / "final.pt")["model"] for name in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    recorded = yaml.safe_load((tmp_path / "runs" / "straight" / "config.yaml").read_text())
    assert recorded["algorithm"] == {"name": "halfway", "procs_per_node": 1, "every": 2}
    out = cli(plugins, str(ROOT / "scripts/plot.py"), str(tmp_path / "runs"), "--out", str(tmp_path / "fig"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| Half-way SGD + SlowMo | 1 | 12 |" in (tmp_path / "fig" / "table.md").read_text()  # one seed, run twice
    assert (tmp_path / "fig" / "curves_epoch.png").read_bytes()[:4] == b"\x89PNG"
    out = cli(plugins, *train, "algorithm.every=0.5", f"hydra.run.dir={tmp_path / 'runs' / 'bad'}")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "error: bad config key 'algorithm.every': Value '0.5' of type 'float' could not be converted to Integer"
    )


UPDATE = '''
"""Sign descent as the outer update: x_{t+1,0} = x_{t,0} - alpha gamma_t sign(Delta_bar)."""

from dataclasses import dataclass

import torch

from slowmo.outer.parts import UPDATES, Update


@dataclass
class SignConfig:
    name: str
    alpha: float  # the step, times gamma_t


@UPDATES.register("sign", SignConfig, label="sign descent")
class Sign(Update):
    def __init__(self, alpha=1.0):
        self.alpha = alpha

    def refuses(self, parts):
        needs = "the sign update needs all of x_{t,0}: use a mean that keeps it whole"
        return needs if parts.mean.shards_state else None

    def bind(self, x0):
        self.x0 = x0.clone()

    def step(self, pieces):
        for piece in pieces:
            x0 = self.x0[piece.start : piece.end]
            torch.add(x0, piece.delta.sign(), alpha=-self.alpha * piece.gamma, out=piece.delta)
            x0.copy_(piece.delta)

    def state_dict(self):
        return {"x0": self.x0.clone()}

    def load_state_dict(self, state, like):
        self.x0 = state["x0"].to(dtype=like.dtype, device=like.device).clone()
'''

UPDATE_CONFIG = """
# Sign descent as the outer update (a test's throw-away part).
name: sign
alpha: 1.0  # the step, times gamma_t
"""


def test_a_new_outer_update_is_one_module_and_one_yaml_file(tmp_path):
    plugins, configs = tmp_path / "plugins", tmp_path / "configs"
    (plugins / "slowmo" / "outer").mkdir(parents=True)
    (plugins / "slowmo" / "outer" / "sign.py").write_text(textwrap.dedent(UPDATE))
    (configs / "slowmo" / "update").mkdir(parents=True)
    (configs / "slowmo" / "update" / "sign.yaml").write_text(UPDATE_CONFIG)
    train = [
        str(ROOT / "experiments/digits/train.py"),
        "algorithm=localsgd",
        "slowmo=on",
        "slowmo/update=sign",
        "slowmo.tau=4",
        "slowmo.update.alpha=0.5",
        "dist=gloo",
        "dist.world_size=2",
        "train.eval_every=0",
        "train.checkpoint_every=4",
        "logger.progress=false",
        f"hydra.searchpath=[file://{configs}]",
    ]
    for name, steps in (("straight", 12), ("resumed", 6), ("resumed", 12)):
        out = cli(plugins, *train, f"train.max_steps={steps}", f"hydra.run.dir={tmp_path / 'runs' / name}")
        assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming at step " in out.stderr
    a, b = (torch.load(tmp_path / "runs" / name / "final.pt")["model"] for name in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    recorded = yaml.safe_load((tmp_path / "runs" / "straight" / "config.yaml").read_text())
    assert recorded["slowmo"]["update"] == {"name": "sign", "alpha": 0.5}
    # the sign update is what ran: slow momentum with the same alpha (beta = 0) ends elsewhere
    out = cli(
        plugins,
        *train[:3],
        *train[4:],
        "slowmo.update.beta=0.0",
        "train.max_steps=12",
        f"hydra.run.dir={tmp_path / 'sm'}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    c = torch.load(tmp_path / "sm" / "final.pt")["model"]
    assert any(not torch.equal(a[k], c[k]) for k in a)
    out = cli(plugins, *train, "slowmo/mean=sharded", f"hydra.run.dir={tmp_path / 'runs' / 'bad'}")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "error: the sign update needs all of x_{t,0}: use a mean that keeps it whole"
    )
    assert not (tmp_path / "runs" / "bad").exists()  # Hydra made the directory; the refused command took it away
