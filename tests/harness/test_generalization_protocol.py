"""The significance protocol of benchmarks/generalization.py: its grid search, Holm's correction, and the committed
tables, recomputed from the committed ledger (runs.csv) alone."""

import csv
import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "generalization"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import generalization

    return generalization


def test_holm_adjusted_p_values_reject_exactly_what_the_step_down_rule_rejects(bench):
    """Holm (1979): order the m p-values, reject H_(1..k) for the largest k with p_(j) <= alpha / (m - j + 1) for
    every j <= k. The adjusted p-value of a hypothesis is <= alpha exactly when that rule rejects it."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = int(rng.integers(1, 6))
        p = list(rng.choice([0.001, 0.01, 0.02, 0.04, 0.3], m) * rng.uniform(0.5, 1.5, m))
        adjusted = bench.holm(p)
        assert all(a >= q for a, q in zip(adjusted, p, strict=True)) and max(adjusted) <= 1.0
        for alpha in (0.01, 0.05, 0.1):
            order = sorted(range(m), key=lambda i: p[i])
            rejected = set()
            for j, i in enumerate(order):
                if p[i] > alpha / (m - j):
                    break
                rejected.add(i)
            assert {i for i in range(m) if adjusted[i] <= alpha} == rejected
    assert bench.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_the_grid_search_ends_where_the_best_point_has_both_neighbours_scored_and_worse(bench):
    grid = bench.LRS
    for peak, start in itertools.product(range(len(grid)), [bench.START_LRS, (0.2,)]):
        scores: dict[float, float] = {}
        while True:
            wanted, best = bench.search(grid, start, scores.get)
            if not wanted:
                break
            scores.update({x: -abs(grid.index(x) - peak) for x in wanted})  # unimodal, highest at the peak
        assert best == grid[peak]
        i = grid.index(best)
        assert all(grid[j] in scores for j in (i - 1, i + 1) if 0 <= j < len(grid))  # both neighbours scored
        low, high = min(peak, *map(grid.index, start)), max(peak, *map(grid.index, start))
        assert set(grid[low : high + 1]) <= set(scores) <= set(grid[max(low - 1, 0) : high + 2])  # the way, and no more
    ties = {0.1: 1.0, 0.2: 1.0, 0.4: 0.0, 0.05: 0.0}
    assert bench.search(grid, bench.START_LRS, ties.get) == ([], 0.1)  # a tie goes to the smaller value


def test_the_committed_tables_are_what_the_committed_ledger_gives(bench, tmp_path):
    rows = list(csv.DictReader((RESULTS / "runs.csv").open()))
    assert {r["purpose"] for r in rows} == {"tune", "evaluate"}
    tune_seeds = {int(r["seed"]) for r in rows if r["purpose"] == "tune"}
    assert tune_seeds == set(bench.TUNE_SEEDS) and not tune_seeds & {
        int(r["seed"]) for r in rows if r["purpose"] == "evaluate"
    }
    out = tmp_path / "generalization"
    shutil.copytree(RESULTS, out)
    tuned = bench.write_tables(rows, out)
    for name in ("tuning.md", "table.md", "paired.md", "ablations.md"):
        assert (out / name).read_text() == (RESULTS / name).read_text(), f"results/generalization/{name} is stale"
    for setting in tuned.values():  # every cell: every evaluation seed, at its tuned setting
        assert sorted(int(r["seed"]) for r in bench.runs_of(rows, setting, bench.EVAL_SEEDS)) == list(bench.EVAL_SEEDS)
