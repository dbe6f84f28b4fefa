"""Trackers: one TensorBoard curve and one W&B run per run folder across a preemption; no token in hparams."""

from __future__ import annotations

import json
import shutil

import pytest

from sdcluster.config import ConfigError
from sdcluster.runtime.step_events import stop_at
from sdcluster.train.loop import train
from sdcluster.train.tracking import check_installed
from tests.conftest import tensorboard_images, tensorboard_scalars

QUICK = ["train.max_steps=5", "train.log_every=1", "train.validate_every=0", "train.validation_steps=1"]


@pytest.mark.slow
def test_tensorboard_curve_continues_across_a_preemption(make_cfg, monkeypatch):
    secret = "sdc-test-secret-0123456789"
    monkeypatch.setenv("SDC_TEST_API_TOKEN", secret)
    tracked = [*QUICK, "train.tracker=tensorboard", "train.checkpoint_every=2"]
    with pytest.raises(ConfigError, match=r"model.revision: looks like a secret token"):
        make_cfg([*tracked, f"model.revision={secret}"])  # a launch refuses it before anything is written
    cfg = make_cfg(tracked)
    cfg.model.revision = secret  # past the launch's check all the same: the tracker still masks it
    with stop_at(lambda step: step == 3):
        stopped = train(cfg)
    assert stopped.interrupted
    folder = stopped.run_dir / "tensorboard"
    first = tensorboard_scalars(folder, "loss")
    assert [step for step, _ in first] == [1, 2, 3]

    # As after a node failure: the newest checkpoint is step 2, so step 3 was logged by an attempt whose
    # work is lost, and the resumed attempt logs step 3 again.
    shutil.rmtree(stopped.run_dir / "checkpoints" / "step-00000003")
    finished = train(cfg)
    assert [step for step, _ in finished.losses] == [3, 4, 5]
    curve = tensorboard_scalars(folder, "loss")
    assert [step for step, _ in curve] == [1, 2, 3, 4, 5]  # one curve: the stale step 3 purged, no fork
    assert curve[:2] == first[:2]
    assert [round(v, 5) for _, v in curve[2:]] == [round(v, 5) for _, v in finished.losses]
    assert [step for step, _ in tensorboard_scalars(folder, "val_loss")] == [5]
    grids = tensorboard_images(folder, "validation")
    assert [step for step, _ in grids] == [5] and grids[0][1] == (64, 64)  # one prompt: a one-tile grid

    hparams = list(folder.rglob("hparams.yml"))
    assert hparams and all(secret not in p.read_text() for p in hparams)
    assert (
        "model.revision: '***'" in hparams[0].read_text()
        or "model.revision: '***'" in hparams[-1].read_text()
    )
    for path in stopped.run_dir.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), f"secret written to {path}"


@pytest.mark.slow
def test_wandb_run_is_resumed_not_split(make_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_cfg([*QUICK, "train.tracker=wandb"])
    with stop_at(lambda step: step == 2):
        stopped = train(cfg)
    run_id = json.loads((stopped.run_dir / "tracker.json").read_text())["wandb_run_id"]
    train(cfg)
    runs = sorted((stopped.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run.name.endswith(f"-{run_id}") for run in runs)


def test_missing_tracker_package_is_a_launch_error(make_cfg, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"train.tracker=wandb needs the wandb package.*pip install wandb"):
        check_installed(make_cfg(["train.tracker=wandb"]))
