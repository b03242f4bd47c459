"""Tables and figures from run directories (slowmo/report.py, scripts/plot.py): a row and a curve per cell, a cell being
the runs that differ in their seed only; each cell named by what tells it from the others; mean ± sample std."""

import json

import numpy as np
import pytest

from slowmo import report
from slowmo.train import run


def _run(tmp_path, name, seed, **sections):
    config = {
        "run_dir": str(tmp_path / name),
        "seed": seed,
        "slowmo": {"enabled": True, "tau": 4},
        "train": {"max_steps": 8, "eval_every": 4},
        "dist": {"world_size": 4},
        "data": {"batch_size": 16},
        "optimizer": {"lr": 0.05},
        "logger": {"progress": False, "log_every": 4},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    run(config)
    return report.load_run(tmp_path / name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    beta = [_run(tmp, f"beta{b}-{s}", s, slowmo={"update": {"beta": b}}) for b in (0.3, 0.8) for s in (0, 1)]
    lr = [_run(tmp, f"lr{lr}", 0, optimizer={"lr": lr}, slowmo={"update": {"beta": 0.3}}) for lr in (0.05, 0.2)]
    return beta, lr


def _final_loss(r) -> float:
    return [m["train_loss"] for m in r["metrics"] if "train_loss" in m][-1]


def test_a_beta_sweep_is_two_cells_named_by_beta_with_the_sample_std_over_their_seeds(runs, tmp_path):
    beta, _ = runs
    cells = report.group(beta)
    assert list(cells) == ["Local SGD + SlowMo, beta=0.3", "Local SGD + SlowMo, beta=0.8"]
    rows = report.table(beta)
    assert [(r["cell"], r["seeds"]) for r in rows] == [(name, 2) for name in cells]
    for row, members in zip(rows, ([beta[0], beta[1]], [beta[2], beta[3]]), strict=True):
        losses = [_final_loss(r) for r in members]
        assert row["train_loss"] == pytest.approx(sum(losses) / 2)
        assert row["train_loss_std"] == pytest.approx(abs(losses[0] - losses[1]) / np.sqrt(2))  # ddof 1, n = 2
    markdown = report.write_table(rows, tmp_path)
    assert "sample std (ddof 1)" in markdown and "| Local SGD + SlowMo, beta=0.8 | 2 | 8 |" in markdown
    report.figure(beta, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert report.title(beta) == "digits, 4 ranks, 8 steps; by beta"


def test_an_lr_sweep_of_one_seed_is_two_rows_without_a_std(runs, tmp_path):
    _, lr = runs
    rows = report.table(lr)
    assert [(r["cell"], r["seeds"], r["train_loss_std"]) for r in rows] == [
        ("Local SGD + SlowMo, lr=0.05", 1, None),
        ("Local SGD + SlowMo, lr=0.2", 1, None),
    ]
    markdown = report.write_table(rows, tmp_path)
    assert "±" not in markdown.split("\n", 3)[-1]  # no ± in the rows (a std of one sample is not a spread)


def test_a_repeated_seed_is_one_seed_and_settings_of_an_outer_step_that_is_off_do_not_split_cells(runs, tmp_path):
    beta, _ = runs
    again = json.loads(json.dumps(beta[0], default=str))  # the same run seen twice (another directory)
    again["dir"] = "elsewhere"
    assert [len(m) for m in report.group([beta[0], again]).values()] == [1]
    off = [dict(r, config={**r["config"], "slowmo": {**r["config"]["slowmo"], "enabled": False}}) for r in beta]
    assert list(report.group(off)) == ["Local SGD"]  # beta means nothing without the outer step


def test_axis_labels_carry_their_units():
    assert report.metric_label("val_acc") == "validation accuracy (%)"
    assert report.metric_label("val_acc_top5") == "validation top-5 accuracy (%)"
    assert report.metric_label("val_bleu") == "validation BLEU"
    assert report.metric_label("train_loss") == "train loss"
    assert report.mean_std([1.0]) == "1.00" and report.mean_std([1.0, 3.0]) == "2.00 ± 1.41"
