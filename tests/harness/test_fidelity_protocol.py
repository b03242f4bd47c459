"""The protocol of benchmarks/fidelity.py: its grid search, Holm's correction, the smallest detectable difference, the
whole protocol run to its end on a synthetic ledger, and the committed tables recomputed from the committed ledgers."""

import csv
import itertools
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "fidelity"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import fidelity

    return fidelity


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


@pytest.mark.parametrize("grid_name", ["SGD_LRS", "BETAS"])
def test_the_grid_search_ends_where_the_best_point_has_both_neighbours_scored_and_worse(bench, grid_name):
    grid = getattr(bench, grid_name)
    starts = [bench.START_BETAS if grid_name == "BETAS" else (0.1, 0.2, 0.4), (grid[2],)]
    for peak, start in itertools.product(range(len(grid)), starts):
        scores: dict[float, float] = {}
        while True:
            wanted, best = bench.search(grid, start, scores.get)
            if not wanted:
                break
            scores.update({x: -abs(grid.index(x) - peak) for x in wanted})  # unimodal, highest at the peak
        assert best == grid[peak]
        i = grid.index(best)
        assert all(grid[j] in scores for j in (i - 1, i + 1) if 0 <= j < len(grid))  # both neighbours scored
        assert set(start) <= set(scores) and len(scores) <= len(start) + abs(peak - min(map(grid.index, start))) + 2
    ties = {0.1: 1.0, 0.2: 1.0, 0.4: 0.0, 0.05: 0.0}
    assert bench.search(bench.SGD_LRS, (0.1, 0.2, 0.4), ties.get) == ([], 0.1)  # a tie goes to the smaller value
    assert bench.BETAS[0] == 0.0 and bench.BETAS[-1] == 0.9 and len(bench.BETAS) == 10


def test_the_smallest_detectable_difference_has_the_stated_power(bench):
    """At the difference ``paired`` calls detectable, the paired t-test's power (the noncentral t distribution,
    computed here) is 0.8, up to the normal approximation of the formula."""
    rng = np.random.default_rng(1)
    for n in (10, 20):
        x, y = rng.normal(0, 1, n), rng.normal(0, 1, n)
        *_, detectable = bench.paired(list(x), list(y))
        sd = np.std(x - y, ddof=1)
        critical = stats.t.ppf(0.975, n - 1)
        shift = detectable / (sd / math.sqrt(n))
        power = stats.nct.sf(critical, n - 1, shift) + stats.nct.cdf(-critical, n - 1, shift)
        assert 0.77 < power < 0.81
        mean, low, high, p, _ = bench.paired(list(x), list(y))
        assert mean == pytest.approx(np.mean(x - y)) and low < mean < high
        assert p == pytest.approx(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def synthetic_ledger(bench, block, peaks):
    """The protocol's loop on a made-up score: each base's accuracy peaks at its lr in ``peaks`` (3 points lost per
    doubling), SlowMo adds 1 - 10 (beta - 0.5)^2 with buffers zeroed and peaks at beta 0.3 with them kept; each seed
    adds seed % 7 / 10."""
    rows = []
    for _ in range(30):
        t = bench.Tables(block, rows)
        jobs = [j for j in dict.fromkeys(bench.jobs_of(t)) if j[:2] not in t.read.index]
        if not jobs:
            return rows, t
        for s, seed, purpose in jobs:
            acc = 90 - 3 * abs(math.log2(s.lr / peaks[s.algorithm])) + seed % 7 / 10
            if s.slowmo:
                acc += 1 - 10 * (s.beta - (0.5 if s.buffers is None else 0.3)) ** 2
            rows.append({"purpose": purpose, "algorithm": s.algorithm, "slowmo": str(s.slowmo), "lr": str(s.lr),
                         "beta": "" if s.beta is None else str(s.beta), "base_buffers": s.buffers or "",
                         "seed": str(seed), "status": "completed", "best_train_loss": "0.1", "best_val_acc": str(acc),
                         "test_acc_at_best_val": str(acc - 1)})  # fmt: skip
    raise AssertionError("the protocol did not end in 30 rounds")


def test_the_protocol_tunes_every_cell_to_its_peak_and_evaluates_it_on_every_seed(bench, tmp_path):
    block = bench.BLOCKS["mnist1d"]
    peaks = dict(zip(block.bases, (0.4, 0.2, 0.8, 0.4), strict=True))
    rows, t = synthetic_ledger(bench, block, peaks)
    assert {int(r["seed"]) for r in rows if r["purpose"] == "tune"} == set(bench.TUNE_SEEDS)
    for a in block.bases:
        lr = peaks[a]
        assert t.tuned[(a, "base")] == bench.Setting(a, False, lr)
        assert t.tuned[(a, "slowmo")] == bench.Setting(a, True, lr, 0.5)  # buffers zeroed: the preset's
        assert t.tuned[(a, "reset")] == bench.Setting(a, True, lr, 0.0)  # the reset alone: beta = 0, zeroed
        assert t.tuned[(a, "average")] == bench.Setting(a, True, lr, 0.0, "keep")  # the average alone
        assert t.tuned[(a, "kept")] == bench.Setting(a, True, lr, 0.3, "keep")
        assert t.tuned[(a, "joint")] == bench.Setting(a, True, lr, 0.5)  # lr x 1/2 and x 2 lose 3 points
        assert all(len(t.final[(a, kind)]) == len(block.eval_seeds) for kind in bench.KINDS)
    assert len(block.eval_seeds) == 20 and not set(block.eval_seeds) & set(bench.TUNE_SEEDS)
    overrides = bench.overrides(block, t.tuned[(block.bases[0], "average")], 3)
    assert "slowmo.base_buffers=keep" in overrides and "slowmo.update.beta=0" in overrides and overrides[-1] == "seed=3"
    bench.write({"mnist1d": t}, tmp_path)
    answer = (tmp_path / "answer.md").read_text()
    assert answer.count("| +1.00 [+1.00, +1.00] ") == 0 and "+1.00 [+1.00, +1.00] (0.000)" in answer
    assert "slow momentum (+2.50, interval excludes 0)" in answer  # the largest step: 88.9 -> 91.4 at beta 0.5
    text = (tmp_path / "mnist1d.md").read_text()
    assert "| Local SGD + SlowMo | 0.2 | 0.5 | reset | 20 |" in text and "**0.5: " in text


def test_the_committed_tables_are_what_the_committed_ledgers_give(bench, tmp_path):
    out = tmp_path / "fidelity"
    shutil.copytree(RESULTS, out)
    tables = {}
    for name, block in bench.BLOCKS.items():
        path = RESULTS / f"runs_{name}.csv"
        if path.is_file():
            rows = list(csv.DictReader(path.open()))
            tune = {int(r["seed"]) for r in rows if r["purpose"] == "tune"}
            assert tune <= set(bench.TUNE_SEEDS)
            assert not tune & {int(r["seed"]) for r in rows if r["purpose"] == "evaluate"}
            assert all(r["commit"] and r["cpu"] and r["cpu_capability"] for r in rows)
            tables[name] = bench.Tables(block, rows)
    bench.write(tables, out)
    for table in [p.name for p in RESULTS.glob("*.md") if p.name not in ("README.md", "findings.md")]:
        assert (out / table).read_text() == (RESULTS / table).read_text(), f"results/fidelity/{table} is stale"


def test_a_rerun_on_another_cpu_is_compared_with_the_ledger_interval_by_interval(bench, tmp_path):
    """The machine table: SlowMo − base per base on the ledger's CPU and on a rerun's, 'yes' where each mean falls in
    the other's 95 % interval. The rerun here: the same numbers plus seed-dependent noise on one base (inside), and
    a shift of 3 points on another (outside), computed by hand from the paired differences."""
    block = bench.BLOCKS["mnist1d"]
    rows, t = synthetic_ledger(bench, block, dict(zip(block.bases, (0.4, 0.2, 0.8, 0.4), strict=True)))
    first, second = block.bases[1], block.bases[2]
    for r in rows:
        r.update(cpu="A", cpu_capability="AVX512")
        if r["purpose"] == "evaluate" and r["slowmo"] == "True":  # (some spread: an interval of some width)
            r["best_val_acc"] = str(float(r["best_val_acc"]) + 0.1 * (int(r["seed"]) % 2 - 0.5))
    t = bench.Tables(block, rows)
    again = []
    for r in rows:
        if r["purpose"] != "evaluate" or r["algorithm"] not in (first, second) or r["base_buffers"]:
            continue
        if (r["slowmo"] == "True") != (r["beta"] == "0.5"):  # (the tuned SlowMo cell: beta 0.5, buffers zeroed)
            continue
        acc = float(r["best_val_acc"])
        if r["slowmo"] == "True":
            acc += 3.0 if r["algorithm"] == second else 0.05 * (int(r["seed"]) % 3 - 1)
        again.append({**r, "best_val_acc": str(acc), "cpu": "B", "cpu_capability": "AVX2"})
    (tmp_path / "machines" / "avx2").mkdir(parents=True)
    with open(tmp_path / "machines" / "avx2" / "runs_mnist1d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(again[0]))
        writer.writeheader()
        writer.writerows(again)
    bench.write({"mnist1d": t}, tmp_path)
    table = (tmp_path / "machines_mnist1d.md").read_text()
    assert "rerun on B (AVX2)" in table and "against the ledger's (A (AVX512))" in table
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines() if "best val acc" in line}
    near = [x for x in lines if x.startswith(block.label(first))][0]
    far = [x for x in lines if x.startswith(block.label(second))][0]
    assert lines[near].endswith("| yes |") and lines[far].endswith("| no |")
    assert "| +3.00 |" in lines[far]  # the difference of the means: the shift
    assert len(lines) == 2  # (only the bases rerun)
