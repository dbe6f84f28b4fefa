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


def test_a_shared_cache_array_is_no_points_job_and_each_point_lists_its_training_first(make_cfg):
    """The ledger's jobs of a point start with its training job (the report reads it so): the cache array
    two points wait on is listed by neither; with ``task=cache`` alone the arrays are the points' jobs."""
    from sdcluster.cluster.submit import plan_jobs
    from sdcluster.sweep.points import _job_ids

    points = [make_cfg(["task=train", "data.cache_shards=2", f"optim.lr={lr}"]) for lr in (1e-4, 5e-5)]
    planned = plan_jobs(points)
    assert [(job.kind, job.serves) for job in planned] == [("cache", [0, 1]), ("train", [])]
    for job in planned:  # as submission fills them in: an array's elements are <id>_<index>
        job.job_ids = [f"{job.kind}1_{k}" for k in range(len(job.fns))]
    assert _job_ids(planned, 2) == [["train1_0"], ["train1_1"]]
    alone = plan_jobs([make_cfg(["task=cache", "data.cache_shards=2"])])
    alone[0].job_ids = ["9_0", "9_1"]
    assert _job_ids(alone, 1) == [["9_0", "9_1"]]
