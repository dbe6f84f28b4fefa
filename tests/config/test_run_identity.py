"""A run folder is named by the keys that change what is learned; the schema says which keys those are.

The expected names were computed before the identity lists moved from ``paths`` into the schema: a run
folder found then must be found now. The sample data's own path depends on where the checkout is, so these
configurations point ``data.path`` at a fixed folder (the hash covers the path, not the folder's files).
"""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from sdcluster import identity, paths
from sdcluster.config import LR_SCHEDULES, Config, DataConfig, OptimConfig, TrainConfig
from tests.conftest import compose

FIXED_DATA = "data.path=/datasets/sample"

EXPECTED = {  # overrides -> (run folder name, config_hash)
    (FIXED_DATA,): ("tiny-d3337f89", "d3337f8917d8b2c2"),
    (FIXED_DATA, "optim.lr=5e-5"): ("tiny-028d4535", "028d4535b86ddc51"),
    (FIXED_DATA, "optim.lr_schedule=cosine"): ("tiny-e199c922", "e199c92270f39e45"),
    (FIXED_DATA, "optim.lr_schedule=cosine", "train.max_steps=100"): ("tiny-59d72626", "59d7262644840459"),
    (FIXED_DATA, "model=sd15"): ("sd15-8cc9889a", "8cc9889ad186065c"),
    (FIXED_DATA, "train.use_ema=true", "run_name=mine"): ("mine-0b1920ee", "0b1920ee066e2eea"),
    ("data=imagefolder", "data.path=/tmp"): ("tiny-b421a312", "b421a312fb463cb9"),
    ("experiment=jeans_sd14", "data=imagefolder", "data.path=/tmp"): ("sd14-04a055da", "04a055da33415488"),
}


@pytest.mark.parametrize("overrides", sorted(EXPECTED))
def test_run_folders_keep_their_names(overrides):
    cfg = compose(list(overrides))
    assert (paths.run_dir(cfg).name, identity.config_hash(cfg)) == EXPECTED[overrides]


@pytest.mark.parametrize(
    "override",
    [
        "train.log_every=3",
        "train.checkpoint_every=7",
        "train.checkpoints_keep=3",
        "train.resume=never",
        "train.allow_resume_change=true",
        "train.validate_every=0",
        "train.validation_prompts=[]",
        "train.validation_steps=5",
        "train.tracker=tensorboard",
        "train.tracker_project=other",
        "train.max_steps=400",  # the default schedule is constant: more steps continue the same run
        "data.num_workers=2",
        "data.cache=false",
        "data.cache_memory_mb=0",
        "data.max_pixels=100",
        "debug=fast",
        "+cluster=slurm",
        "generate.steps=3",
    ],
)
def test_settings_that_do_not_change_what_is_learned_keep_the_run_folder(override):
    assert paths.run_dir(compose([FIXED_DATA, override])).name == EXPECTED[(FIXED_DATA,)][0]


@pytest.mark.parametrize(
    "override",
    [
        "train.seed=1",
        "train.resolution=128",
        "data.holdout=1",
        "data.caption_column=caption",
        "optim.eps=1e-6",
    ],
)
def test_settings_that_change_what_is_learned_change_the_run_folder(override):
    assert paths.run_dir(compose([FIXED_DATA, override])).name != EXPECTED[(FIXED_DATA,)][0]


def test_identity_lists_name_fields_and_stay_out_of_the_composed_config():
    for cls in (TrainConfig, DataConfig):
        names = {f.name for f in dataclasses.fields(cls)}
        assert set(cls.NOT_IDENTITY) <= names and "NOT_IDENTITY" not in names
    assert set(OptimConfig.STEPS_FREE_SCHEDULES) <= set(LR_SCHEDULES)
    schema = OmegaConf.structured(Config)  # ClassVars are not config keys: nobody can override them
    assert "NOT_IDENTITY" not in schema.train and "NOT_IDENTITY" not in schema.data
    assert "STEPS_FREE_SCHEDULES" not in schema.optim
    semantic = identity.semantic_train_config(compose([FIXED_DATA]))
    assert not set(TrainConfig.NOT_IDENTITY) & set(semantic["train"]) and "max_steps" not in semantic["train"]
    assert not set(DataConfig.NOT_IDENTITY) & set(semantic["data"])
