"""Sweep points are checked together before anything is queued (through launch: tests/test_slurm_sweep.py)."""

from __future__ import annotations

import pytest

from sdcluster.config import ConfigError
from sdcluster.sweep.points import Point, check_distinct_outputs


def _point(make_cfg, *overrides: str) -> Point:
    return Point(make_cfg(["+cluster=slurm", *overrides]), ["+cluster=slurm", *overrides])


def test_points_that_would_train_one_run_folder_at_once_are_refused(make_cfg):
    points = [_point(make_cfg, "task=train", f"train.log_every={n}") for n in (5, 10)]
    message = r"sweep points 0 \{'train.log_every': '5'\} and 1 \{'train.log_every': '10'\} would train"
    with pytest.raises(ConfigError, match=message + r".*do not change what is learned. Fix: sweep a key"):
        check_distinct_outputs(points)


def test_points_that_would_generate_into_one_folder_are_refused(make_cfg):
    points = [_point(make_cfg, "task=generate", f"generate.batch_size={n}") for n in (2, 4)]
    with pytest.raises(ConfigError, match="would generate into the same folder at once"):
        check_distinct_outputs(points)


def test_points_that_change_training_pass(make_cfg):
    check_distinct_outputs([_point(make_cfg, "task=train", f"optim.lr={lr}") for lr in (1e-4, 5e-5)])
    check_distinct_outputs([_point(make_cfg, "task=generate", f"generate.seed={s}") for s in (0, 1)])
