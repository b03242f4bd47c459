"""A benchmark's ``results/<bench>/README.md``, written from what the benchmark wrote beside it: what was run (the
script's docstring), where and when (``provenance.json``), every table (each ``.md`` table the benchmark wrote,
verbatim; each CSV without one, rendered, or linked when it is long), every figure, and what the numbers show
(``findings.md``, written by hand after reading them and kept across reruns).

Every benchmark calls :func:`write_readme` at its end, so the README never drifts from its CSV; rewrite them without
a rerun with ``python benchmarks/readme.py [bench ...]`` (default: every folder of ``results/`` named after a script
of ``benchmarks/``).
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LONGEST_TABLE = 30  # rows; a longer CSV is linked, not rendered
OWN = ("README.md", "findings.md")


def record(out: Path, script: str | Path, argv: list[str] | None, key: str | None = None, **extra: Any) -> Path:
    """End a benchmark's run: record in ``out/provenance.json`` (under ``key``, for a benchmark whose runs write
    different tables there) the command that ran (the script and ``argv``, or the command line's), the date, the
    machine and the commit, with ``extra``; then write the README. Returns its path."""
    path = Path(out) / "provenance.json"
    command = " ".join(["python", f"benchmarks/{Path(script).name}", *(sys.argv[1:] if argv is None else argv)])
    here = provenance(command, **extra)
    if key is not None:
        here = {**(json.loads(path.read_text()) if path.is_file() else {}), key: here}
    path.write_text(json.dumps(here, indent=2) + "\n")
    readme = write_readme(out, script)
    print(f"wrote {readme}: read the new numbers against its 'What it shows' ({Path(out) / 'findings.md'})")
    return readme


def provenance(command: str, **extra: Any) -> dict[str, Any]:
    """What a benchmark records about its run: the command, the date, the machine and the commit."""
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} CPU threads, {gpu}, torch {torch.__version__}",
        "commit": commit,
        **extra,
    }


def write_readme(out: Path, script: str | Path) -> Path:
    """Write ``out/README.md`` for the benchmark ``script`` from the files in ``out``; returns its path."""
    out, script = Path(out), Path(script)
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    title, _, about = doc.partition("\n")
    lines = [
        f"# {title.strip().rstrip('.')}",
        "",
        "## What was run",
        "",
        f"`benchmarks/{script.name}`:",
        "",
        about.strip(),
        "",
    ]
    prov = out / "provenance.json"
    if prov.is_file():
        lines += ["## Where and when", "", *_provenance(json.loads(prov.read_text())), ""]
    tables = sorted(p for p in out.glob("*.md") if p.name not in OWN)
    lines += ["## Tables", ""]
    for table in tables:
        lines += [f"`{table.name}`:", "", table.read_text().strip(), ""]
    for data in sorted(out.glob("*.csv")):
        if data.with_suffix(".md").is_file():
            continue
        rows = list(csv.reader(data.open()))
        if len(rows) - 1 > LONGEST_TABLE:
            lines += [f"[`{data.name}`]({data.name}): {len(rows) - 1} rows.", ""]
        else:
            lines += [f"`{data.name}`:", "", *_markdown(rows), ""]
    figures = sorted(out.glob("*.png"))
    if figures:
        lines += ["## Figures", "", *(f"![{p.stem}]({p.name})" for p in figures), ""]
    findings = out / "findings.md"
    lines += ["## What it shows", ""]
    lines.append(findings.read_text().strip() if findings.is_file() else "Not read yet: write findings.md beside this.")
    readme = out / "README.md"
    readme.write_text("\n".join(lines).rstrip() + "\n")
    return readme


def _provenance(record: dict[str, Any], indent: str = "") -> list[str]:
    lines = []
    for key, value in record.items():
        if isinstance(value, dict):
            lines += [f"{indent}- {key}:", *_provenance(value, indent + "  ")]
        else:
            lines.append(f"{indent}- {key}: {json.dumps(value) if isinstance(value, list) else value}")
    return lines


def _markdown(rows: list[list[str]]) -> list[str]:
    head, *body = rows
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(_cell(c) for c in row) + " |" for row in body),
    ]


def _cell(text: str) -> str:
    try:
        value = float(text)
    except ValueError:
        return text.replace("|", "\\|")
    return text if value.is_integer() and "." not in text else f"{value:.4g}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benches", nargs="*", help="folders of results/ (default: each named after a benchmark)")
    parser.add_argument("--results", type=Path, default=Path("results"))
    args = parser.parse_args(argv)
    benches = args.benches or sorted(p.name for p in args.results.iterdir() if (HERE / f"{p.name}.py").is_file())
    for bench in benches:
        print(write_readme(args.results / bench, HERE / f"{bench}.py"))


if __name__ == "__main__":
    main()
