"""The sweep report's plot shows every point, also one that has logged a single loss so far."""

from __future__ import annotations

import json
from pathlib import Path

from sdcluster.sweep.report import figure


def _point(tmp: Path, index: int, losses: list[float]) -> dict:
    run = tmp / f"run{index}"
    run.mkdir()
    lines = [json.dumps({"step": step, "loss": loss}) for step, loss in enumerate(losses, 1)]
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return {"index": index, "values": {"optim.lr": str(index)}, "run_dir": str(run)}


def test_points_with_one_loss_are_drawn_as_markers(tmp_path):
    record = {"sweep_id": "s", "points": [_point(tmp_path, 0, [0.5]), _point(tmp_path, 1, [0.4, 0.3])]}
    fig = figure(record)
    lines = fig.axes[0].get_lines()
    assert [len(line.get_xdata()) for line in lines] == [1, 2]
    assert all(line.get_marker() not in (None, "", "None") for line in lines), "a one-point line is invisible"
