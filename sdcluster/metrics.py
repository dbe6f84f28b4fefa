"""A run's ``metrics.jsonl``: what the run measured, one JSON object a line.

Rank 0 appends ``{step, loss, lr, time}`` every ``train.log_every`` steps and ``{step, val_loss, time}`` at
each validation; :mod:`sdcluster.logs`, the sweep report and the trainer (which steps are already validated)
read it. Appending keeps the history of every attempt of a requeued job in one file; a line torn by a kill is
skipped by the reader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

Curve = list[tuple[int, float]]


def append(path: Path, record: dict[str, Any]) -> None:
    """One line; after a line torn by a kill, a newline first, so only the torn line is lost."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab+") as fh:  # appends go to the end whatever the read position
        end = fh.seek(0, 2)
        torn = False
        if end:
            fh.seek(end - 1)
            torn = fh.read(1) != b"\n"
        fh.write((b"\n" if torn else b"") + json.dumps(record).encode() + b"\n")


def read(path: Path) -> tuple[Curve, Curve]:
    """(training losses, validation losses) as (step, value) pairs, in the order they were written."""
    train: Curve = []
    val: Curve = []
    if not path.is_file():
        return train, val
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            if "loss" in record:
                train.append((int(record["step"]), float(record["loss"])))
            if "val_loss" in record:
                val.append((int(record["step"]), float(record["val_loss"])))
        except (ValueError, TypeError, KeyError):  # a torn or foreign line
            continue
    return train, val


def validated_steps(path: Path) -> set[int]:
    return {step for step, _ in read(path)[1]}
