"""The README's code runs as written: every Python block, and the loop snippet on real gloo processes as its comment
offers (each in a fresh interpreter, in an empty working directory)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    (cwd / "block.py").write_text(code)
    return subprocess.run([sys.executable, "block.py"], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_python_block_of_the_readme_runs_as_written(index, tmp_path):
    out = _run(BLOCKS[index], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]


def test_the_loop_snippet_runs_on_gloo(tmp_path):
    snippet = next(block for block in BLOCKS if "slowmo.comm.spawn(" in block)
    on_gloo = snippet.replace('backend="simulated"', 'backend="gloo"')
    assert on_gloo != snippet
    out = _run(on_gloo, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"[-+\d.e]+", out.stdout.strip().splitlines()[-1])]
    assert len(losses) == 4 and all(loss < 0.1 for loss in losses)  # 4 ranks fit a target of variance 10


COMMANDS = [
    line.strip()
    for block in re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    for line in block.replace("\\\n", " ").splitlines()
    if line.strip().startswith("python experiments/")
]


def _activated(command: str) -> subprocess.CompletedProcess:
    """``command`` in a shell where the README's activation line ran first, from the repository's root."""
    activate = Path(sys.executable).parent / "activate"  # the environment these tests run in (make test: .venv)
    script = f"source {activate} && cd {ROOT} && {command}"
    return subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=300, env={"PATH": "/usr/bin:/bin"}
    )


def test_every_training_command_of_the_readme_composes():
    """Every ``python experiments/...`` line of the README, as written (its comment, a trailing ``...`` and the
    placeholders aside; a sweep's first cell), passes the command line's checks and composes into a config."""
    from slowmo.train import compose, validate
    from slowmo.train.cli import check_command_line

    assert len(COMMANDS) >= 10
    for command in COMMANDS:
        words = re.sub(r"<[^>]+>", "x", command.split("#")[0].replace(" ...", "")).split()
        task = re.fullmatch(r"experiments/(\w+)/train.py", words[1]).group(1)
        cell = [re.sub(r"=([^,\[]+),\S+$", r"=\1", w) for w in words[2:] if w != "-m"]
        cell = [w.replace("$(hostname)", "localhost") for w in cell]
        check_command_line(cell, f"train_{task}")
        validate(compose([*cell, "run_dir=x"], config_name=f"train_{task}"))  # and passes the config's checks


def test_a_training_command_of_the_readme_runs_as_written_after_the_activation_line():
    command = next(c for c in COMMANDS if c.startswith("python experiments/digits/train.py algorithm=sgp slowmo=on"))
    out = _activated(command.split("#")[0])
    try:
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.startswith("done: 300 steps, ")
    finally:
        made = re.search(r" -> (\S+)$", out.stdout.strip())
        if made:
            shutil.rmtree(ROOT / made.group(1), ignore_errors=True)
