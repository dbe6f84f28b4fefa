"""Every optimizer under train.strategy=fsdp: those that step sharded parameters train on two CPU ranks and
resume bit-exact; those that cannot are refused on the login node, with the fix.

Two-rank runs as in :mod:`tests.train.test_fsdp` (its helpers start them).
"""

from __future__ import annotations

import pytest
import torch

from sdcluster.config import ConfigError
from sdcluster.config.optim import OPTIMIZERS
from tests.conftest import compose
from tests.train.test_fsdp import RUN, _assert_bitwise, _base, _newest, _ranks, _sharded_state

UNSHARDABLE = [name for name, schema in OPTIMIZERS.items() if schema.UNSHARDABLE is not None]


def test_the_optimizers_that_cannot_step_shards_are_the_ones_that_failed_to():
    """bitsandbytes' 8-bit kernels and transformers' Adafactor fail at their first step on FSDP2's DTensor
    parameters (found by running each on two ranks); AdamW and Prodigy step them."""
    assert sorted(UNSHARDABLE) == ["adafactor", "adamw8bit"]


@pytest.mark.parametrize(
    "overrides", [[f"optim={name}"] for name in UNSHARDABLE] + [["optim=prodigy", "optim.slice_p=11"]]
)
def test_what_cannot_step_shards_is_refused_before_the_queue(overrides):
    """Prodigy's slice_p > 1 slices each whole weight: sharded, the slice gathers it on every rank and the
    all-reduced step-size estimate counts it once per rank (twice the unsharded sum on two ranks)."""
    with pytest.raises(ConfigError) as err:
        compose(["train.strategy=fsdp", *overrides])
    message = str(err.value)
    assert message.startswith("optim:") and overrides[-1].split("=")[0] in message
    assert "Fix: use optim=adamw or optim=prodigy (default settings) with train.strategy=fsdp" in message
    assert message.endswith("or train.strategy=ddp")
    compose(overrides)  # under DDP it is as before


def _optimizer_groups(checkpoint) -> list[dict]:
    """The optimizer's param groups a DDP checkpoint holds (accelerate's ``optimizer.bin``)."""
    return torch.load(checkpoint / "optimizer.bin", weights_only=False)["param_groups"]


@pytest.mark.slow
def test_prodigy_estimates_the_step_size_of_the_whole_model_and_resumes_bit_exact(make_cfg, tmp_path):
    """Prodigy's step size comes from sums over every trained element: sharded, each rank holds half of
    them, and the estimate must still be the whole model's (the one DDP gets), else the ranks' steps differ.
    A stopped run then resumes bit for bit, the estimate included."""
    run = [*RUN, "optim=prodigy", "optim.d0=1e-4", "train.max_steps=4"]
    fsdp = [*run, "train.strategy=fsdp"]
    ddp = _ranks(tmp_path, 2, [*_base(make_cfg, "ddp"), *run])
    straight = _ranks(tmp_path, 2, [*_base(make_cfg, "a"), *fsdp])
    for (_, a), (_, b) in zip(ddp["losses"], straight["losses"], strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=0)  # float32 sums in another order, as in test_fsdp
    (replicated,) = _optimizer_groups(_newest(ddp["run_dir"]))
    sharded = _sharded_state(_newest(straight["run_dir"]), tmp_path)["optim"]["param_groups"]
    for key in ("d", "d_numerator", "d_denom"):
        value = sharded[key] if isinstance(sharded, dict) else sharded[0][key]
        assert float(value) == pytest.approx(float(replicated[key]), rel=1e-4), key

    first = _ranks(tmp_path, 2, [*_base(make_cfg, "b"), *fsdp], stop=2)
    assert first["interrupted"] and first["step"] == 2
    second = _ranks(tmp_path, 2, [*_base(make_cfg, "b"), *fsdp])
    assert "resumed from" in second["log"] and second["step"] == 4
    assert second["losses"] == [pair for pair in straight["losses"] if pair[0] > 2]
    end_a, end_b = _newest(straight["run_dir"]), _newest(second["run_dir"])
    _assert_bitwise(_sharded_state(end_a, tmp_path), _sharded_state(end_b, tmp_path))
