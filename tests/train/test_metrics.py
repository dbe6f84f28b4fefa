"""A run's metrics.jsonl: a line torn by a kill costs that line only, not the next attempt's first record."""

from __future__ import annotations

from sdcluster.train import metrics


def test_torn_last_line_loses_only_itself(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    metrics.append(path, {"step": 1, "loss": 0.5})
    with path.open("a") as fh:
        fh.write('{"step": 2, "lo')  # the process was killed mid-write
    metrics.append(path, {"step": 2, "val_loss": 0.4})  # the requeued attempt's first record
    metrics.append(path, {"step": 3, "loss": 0.3})
    assert metrics.read(path) == ([(1, 0.5), (3, 0.3)], [(2, 0.4)])
    assert metrics.validated_steps(path) == {2}


def test_missing_file_and_foreign_lines_read_as_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert metrics.read(path) == ([], [])
    path.write_text('[1, 2]\n"text"\n{"step": "x", "loss": 1}\n{"step": 4, "loss": 0.25}\n')
    assert metrics.read(path) == ([(4, 0.25)], [])
