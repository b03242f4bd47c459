"""The benchmarks' configurations live in ``configs/benchmark/``: every suite there composes into checked configs
with distinct names, a SlowMo cell finds its base, and no benchmark names a plug-in in its code."""

import ast
import re
from pathlib import Path

import pytest

from slowmo.algorithms import ALGORITHMS
from slowmo.graphs import GRAPHS
from slowmo.models import MODELS
from slowmo.outer.parts import MEANS, UPDATES
from slowmo.tasks import TASKS
from slowmo.train.config import CONFIG_DIR
from slowmo.train.optimizers import OPTIMIZERS
from slowmo.train.schedule import SCHEDULES

ROOT = Path(__file__).resolve().parents[2]
SUITES = sorted(p.stem for p in (CONFIG_DIR / "benchmark").glob("*.yaml") if "cells:" in p.read_text())


@pytest.fixture
def common(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import common

    return common


@pytest.mark.parametrize("name", SUITES)
def test_a_suite_is_checked_configs_with_distinct_names(common, name):
    spec = common.suite(name)
    preset = [f"+experiment={spec['preset']}"] if "preset" in spec else []  # (the cells of a preset's runs)
    configs = {label: common.config(preset, spec.get("base", "").split(), c) for label, c in spec["cells"].items()}
    assert len(configs) == sum(1 for _ in spec["cells"]) and all(configs)  # (a repeated name would merge cells)
    pairs = dict(common.with_and_without(configs))
    for label, config in configs.items():
        if not config.slowmo.enabled:
            continue
        bases = [b for b, c in configs.items() if not c.slowmo.enabled and c.algorithm == config.algorithm]
        assert pairs.get(label) == (bases[0] if len(bases) == 1 else None), label


def test_registry_named_cells_carry_the_registries_labels(common):
    assert list(common.suite("speed")["cells"]) == ["AR-SGD", "Local SGD", "Local SGD + SlowMo", "SGP", "SGP + SlowMo"]
    volume = common.suite("comm_volume")["cells"]
    assert volume["OSGP + SlowMo"] == ["algorithm=osgp", "slowmo=on"] and len(volume) == 8


def _plugin_names() -> set[str]:
    names = {e.name for r in (ALGORITHMS, UPDATES, MEANS, TASKS, MODELS, OPTIMIZERS, SCHEDULES, GRAPHS) for e in r}
    presets = {p.stem for p in (CONFIG_DIR / "slowmo").glob("*.yaml")} - {"on", "off"}
    return names | presets


def named_plugins(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, text) of each string in ``source`` that names a plug-in: the name itself, or an override ``key=name``
    (dict keys, subscripts, docstrings and the names of modules the source imports, ``"torch"``, are not names of
    plug-ins)."""
    tree = ast.parse(source)
    keys = {id(k) for node in ast.walk(tree) if isinstance(node, ast.Dict) for k in node.keys if k is not None}
    keys |= {id(node.slice) for node in ast.walk(tree) if isinstance(node, ast.Subscript)}
    imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    names = names - imported
    docs = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef) and node.body
        and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
    }  # fmt: skip
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in keys | docs:
            text = node.value
            overrides = re.findall(r"[\w./]+=([\w]+)", text)
            if text in names or any(value in names for value in overrides):
                found.append((node.lineno, text))
    return found


def test_no_benchmark_names_a_plugin_in_its_code():
    names = _plugin_names()
    assert named_plugins('x = "algorithm=localsgd"\ny = {"sgp": w["sgp"]}\nz = "sgp"\n', names) == [
        (1, "algorithm=localsgd"),
        (3, "sgp"),
    ]
    found = {p.name: named_plugins(p.read_text(), names) for p in sorted((ROOT / "benchmarks").glob("*.py"))}
    assert {name: hits for name, hits in found.items() if hits} == {}
