"""The README's code runs as written: every Python block, and the loop snippet on real gloo processes as its comment
offers (each in a fresh interpreter, in an empty working directory)."""

import re
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
