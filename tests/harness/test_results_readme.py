"""Each benchmark's results/<bench>/README.md is written from what the benchmark wrote beside it (benchmarks/readme.py),
and the committed ones are exactly what the writer makes of the committed files: a README cannot drift from its CSV."""

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def readme(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import readme

    return readme


def _bench(tmp_path: Path) -> tuple[Path, Path]:
    script = tmp_path / "toy.py"
    script.write_text('"""A toy benchmark: what it times.\n\nIt runs two things\nside by side."""\n')
    out = tmp_path / "results" / "toy"
    out.mkdir(parents=True)
    (out / "toy.csv").write_text("setup,ratio,unit\nours vs | theirs,1.23456789,it/s\nplain,2,it/s\n")
    (out / "runs.csv").write_text("run,acc\n" + "".join(f"{i},{i / 3}\n" for i in range(40)))
    (out / "table.csv").write_text("a,b\n1,2\n")
    (out / "table.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
    (out / "curves.png").write_bytes(b"\x89PNG")
    return script, out


def test_the_readme_holds_what_was_run_every_table_every_figure_and_the_findings(readme, tmp_path):
    script, out = _bench(tmp_path)
    text = readme.write_readme(out, script).read_text()
    assert text.startswith("# A toy benchmark: what it times\n")
    assert "`benchmarks/toy.py`:\n\nIt runs two things\nside by side." in text
    assert "| setup | ratio | unit |" in text and "| ours vs \\| theirs | 1.235 | it/s |" in text
    assert "| plain | 2 | it/s |" in text
    assert "[`runs.csv`](runs.csv): 40 rows." in text and "| 39 |" not in text  # long: linked, not rendered
    assert text.count("| a | b |") == 1  # the table's .md, verbatim; its CSV is not rendered again
    assert "![curves](curves.png)" in text
    assert "## Where and when" not in text and text.rstrip().endswith("Not read yet: write findings.md beside this.")
    (out / "findings.md").write_text("SlowMo halves the loss.\n")
    assert readme.write_readme(out, script).read_text().rstrip().endswith("## What it shows\n\nSlowMo halves the loss.")


def test_a_run_records_its_command_machine_and_commit_under_its_key(readme, tmp_path):
    script, out = _bench(tmp_path)
    readme.record(out, script, ["--suite", "a"], key="a", wall_time_s=3)
    readme.record(out, script, ["--suite", "b"], key="b")
    prov = json.loads((out / "provenance.json").read_text())
    assert set(prov) == {"a", "b"} and prov["a"]["command"] == "python benchmarks/toy.py --suite a"
    assert prov["a"]["wall_time_s"] == 3 and "torch" in prov["b"]["machine"] and prov["b"]["commit"]
    text = (out / "README.md").read_text()
    assert "- a:\n  - command: python benchmarks/toy.py --suite a\n" in text and "  - wall_time_s: 3\n" in text


BENCHES = sorted(p.name for p in (ROOT / "results").iterdir() if (ROOT / "benchmarks" / f"{p.name}.py").is_file())


def test_every_benchmark_with_results_has_a_folder_of_its_own():
    assert {"reproduce", "fidelity", "beyond", "comm_volume", "emulated_network", "speed", "simulator"} <= set(BENCHES)


@pytest.mark.parametrize("bench", BENCHES)
def test_the_committed_readme_is_what_the_writer_makes_of_the_committed_files(readme, bench, tmp_path):
    copy = shutil.copytree(ROOT / "results" / bench, tmp_path / bench)
    made = readme.write_readme(copy, ROOT / "benchmarks" / f"{bench}.py").read_text()
    assert (ROOT / "results" / bench / "README.md").read_text() == made, (
        f"results/{bench}/README.md is stale: python benchmarks/readme.py {bench}"
    )
    assert "Not read yet" not in made, f"results/{bench}/findings.md is missing"
