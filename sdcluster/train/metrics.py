"""A run's ``metrics.jsonl``: what the run measured, one JSON object a line.

Rank 0 appends ``{step, loss, lr, time}`` every ``train.log_every`` steps and ``{step, val_loss, time}`` at
each validation; :mod:`sdcluster.logs`, the sweep report and the training loop (which steps are already
validated) read it. Appending keeps the history of every attempt of a requeued job in one file; a line torn
by a kill is skipped by the reader (:func:`sdcluster.atomic.read_jsonl`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdcluster import atomic

Curve = list[tuple[int, float]]


def append(path: Path, record: dict[str, Any]) -> None:
    atomic.append_jsonl(path, record)


def read(path: Path) -> tuple[Curve, Curve]:
    """(training losses, validation losses) as (step, value) pairs, in the order they were written."""
    train: Curve = []
    val: Curve = []
    for record in atomic.read_jsonl(path):
        try:
            if "loss" in record:
                train.append((int(record["step"]), float(record["loss"])))
            if "val_loss" in record:
                val.append((int(record["step"]), float(record["val_loss"])))
        except (ValueError, TypeError, KeyError):  # a foreign line
            continue
    return train, val


def validated_steps(path: Path) -> set[int]:
    return {step for step, _ in read(path)[1]}
