"""``make quickstart`` end to end, on two of its cells and a few steps: the runs, the table, the figure and its
title, and a second call that skips the finished cells."""

import slowmo.quickstart as quickstart


def test_the_quickstart_runs_its_cells_then_writes_the_table_and_the_figure(tmp_path, monkeypatch, capsys):
    short = ["train.max_steps=24", "train.eval_every=12", "seed=0"]
    cells = [["algorithm=localsgd", "slowmo=off", *short], ["algorithm=localsgd", "slowmo=on", *short]]
    monkeypatch.setattr(quickstart, "sweep", lambda preset: cells)
    titles = []
    figure = quickstart.report.figure
    monkeypatch.setattr(
        quickstart.report, "figure", lambda runs, path, x, title: titles.append(title) or figure(runs, path, x, title)
    )
    quickstart.main(["--runs", str(tmp_path)])
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "table.csv").exists()
    rows = (tmp_path / "table.md").read_text()
    assert "| Local SGD |" in rows and "| Local SGD + SlowMo |" in rows
    assert titles == [
        "digits, 8 simulated ranks, 24 steps (tau = 12, beta = 0.7)"
    ]  # the SlowMo cell's, from the preset
    capsys.readouterr()
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")}
    quickstart.main(["--runs", str(tmp_path)])  # again: the finished cells are not run again
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("summary.json")} == stamps
