"""``train.epochs`` counted into optimizer steps before submission, and ``data.max_samples``."""

from __future__ import annotations

import dataclasses

import pytest

from sdcluster import identity, paths
from sdcluster.cluster.preflight import preflight
from sdcluster.config import ConfigError
from sdcluster.data.dataset import load_captioned_images
from sdcluster.data.epochs import resolve_length, steps_for_epochs
from sdcluster.data.loader import training_rows
from sdcluster.data.split import holdout_split
from tests.conftest import compose, copy_sample


@pytest.fixture
def folder(tmp_path):
    """Seven images, two of them held out by the overrides below: five to train on."""
    return copy_sample(tmp_path / "seven", 7)


def _data(folder) -> list[str]:
    return ["data=imagefolder", f"data.path={folder}", "data.holdout=2", "train.batch_size=2"]


@pytest.mark.parametrize(
    ("overrides", "steps"),
    [
        (["train.epochs=3"], 8),  # 15 images read at 2 a step: the last step reads the 15th and the next
        (["train.epochs=3", "train.grad_accum=2"], 4),
        (["train.epochs=3", "data.max_samples=3"], 5),
        (["train.epochs=1", "data.max_samples=100"], 3),  # more than there are: all five
    ],
)
def test_epochs_become_max_steps_from_the_training_split(make_cfg, folder, overrides, steps):
    cfg = make_cfg([*_data(folder), *overrides])
    assert cfg.train.max_steps is None
    resolved = resolve_length(cfg)
    assert resolved.train.max_steps == steps
    assert cfg.train.max_steps is None, "the caller's config is left as it is"


def test_the_world_size_divides_the_steps(make_cfg, folder):
    assert steps_for_epochs(3, 5, 2 * 1 * 4) == 2
    cfg = make_cfg([*_data(folder), "train.epochs=3"])
    four = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, tasks_per_node=4))
    assert four.cluster.world_size == 4 and resolve_length(four).train.max_steps == 2


def test_without_epochs_max_steps_keeps_its_default_and_decides(make_cfg, folder):
    cfg = make_cfg(_data(folder))
    assert cfg.train.max_steps == 40 and resolve_length(cfg) is cfg


@pytest.mark.parametrize(
    "overrides",
    [["train.max_steps=100"], ["experiment=sd15_full", "model=tiny", "train.resolution=64"]],
    ids=["typed", "from-an-experiment"],
)
def test_max_steps_and_epochs_that_disagree_are_refused_with_the_fix(make_cfg, folder, overrides):
    cfg = make_cfg([*overrides, *_data(folder), "train.epochs=3", "train.mixed_precision=no"])
    refused = r"train.max_steps=\d+ and train.epochs=3.* \d+ steps.*max_steps=null"
    with pytest.raises(ConfigError, match=refused):
        resolve_length(cfg)
    agreeing = make_cfg([*_data(folder), "train.epochs=3", "train.max_steps=8"])
    assert resolve_length(agreeing).train.max_steps == 8


def test_preflight_submits_the_counted_steps_in_the_folder_of_those_steps(make_cfg, folder):
    """What is submitted (and recorded) says max_steps; a run by epochs is the run of the same steps (with
    a schedule over the steps, so that other steps are another run)."""
    common = [*_data(folder), "task=train", "optim.lr_schedule=cosine"]
    submitted, _ = preflight(make_cfg([*common, "train.epochs=3"]), dry_run=True)
    assert (submitted.train.epochs, submitted.train.max_steps) == (3, 8)
    assert paths.run_dir(submitted) == paths.run_dir(make_cfg([*common, "train.max_steps=8"]))
    assert paths.run_dir(submitted) != paths.run_dir(make_cfg([*common, "train.max_steps=10"]))


def test_refused_schema_values_name_the_key():
    for override, key in [
        ("train.epochs=0", "train.epochs"),
        ("data.max_samples=0", "data.max_samples"),
        ("data.caption_dropout=1.0", "data.caption_dropout"),
        ("data.caption_dropout=-0.1", "data.caption_dropout"),
    ]:
        with pytest.raises(ConfigError, match=key):
            compose([override])


def test_max_samples_trains_on_the_first_images_of_the_training_split(make_cfg, folder):
    cfg = make_cfg([*_data(folder), "data.max_samples=3"])
    train, held = holdout_split(7, 2)
    names = list(load_captioned_images(folder)["file_name"])  # every row, in the job's order
    rows = training_rows(cfg)
    assert list(rows["file_name"]) == [names[i] for i in train[:3]]
    assert list(training_rows(cfg)["file_name"]) == list(rows["file_name"]), "the same every time"
    assert not set(rows["file_name"]) & {names[i] for i in held}


def test_new_data_keys_join_the_identity_only_when_set(folder):
    base = compose(["data=imagefolder", "data.path=/datasets/x"])
    for override in ("data.max_samples=3", "data.caption_dropout=0.1"):
        assert identity.run_hash(compose(["data=imagefolder", "data.path=/datasets/x", override])) != (
            identity.run_hash(base)
        ), override
    for unset in ("data.max_samples=null", "data.caption_dropout=0"):
        assert identity.run_hash(compose(["data=imagefolder", "data.path=/datasets/x", unset])) == (
            identity.run_hash(base)
        ), unset
