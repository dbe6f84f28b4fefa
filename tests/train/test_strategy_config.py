"""train.strategy on the login node: the names the schema accepts are the strategies that exist, the run
folder changes only for fsdp, and what FSDP does not do is refused before anything is queued."""

from __future__ import annotations

import pytest

from sdcluster.config import ConfigError
from sdcluster.config.train import TRAIN_STRATEGIES
from sdcluster.identity import run_hash
from sdcluster.train.strategy import STRATEGIES
from tests.conftest import compose


def test_the_schema_names_exactly_the_implemented_strategies():
    assert set(TRAIN_STRATEGIES) == set(STRATEGIES)
    assert {name: cls.keeps_ema for name, cls in STRATEGIES.items()} == TRAIN_STRATEGIES


def test_fsdp_is_a_run_of_its_own_and_ddp_keeps_the_folders_of_before():
    plain = run_hash(compose([]))
    assert run_hash(compose(["train.strategy=ddp"])) == plain
    fsdp = run_hash(compose(["train.strategy=fsdp"]))
    assert fsdp != plain
    assert run_hash(compose(["train.strategy=fsdp", "train.fsdp_offload=true"])) == fsdp  # a placement


@pytest.mark.parametrize(
    ("overrides", "named", "fix"),
    [
        (["train.strategy=zero3"], "train.strategy", "ddp, fsdp"),
        (["train.fsdp_offload=true"], "train.fsdp_offload", "train.strategy=fsdp"),
        (
            ["train.strategy=fsdp", "train.method=lora", "train.lora.text_encoder_lr=1e-5"],
            "train.lora.text_encoder_lr",
            "train.strategy=ddp",
        ),
        (["train.strategy=fsdp", "train.mixed_precision=fp16"], "train.mixed_precision", "bf16"),
    ],
)
def test_what_fsdp_does_not_do_is_refused_with_a_fix(overrides, named, fix):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert named in str(err.value) and "Fix:" in str(err.value) and fix in str(err.value)
