"""The memory plan's activations for the transformer families (SD 3.x, FLUX.1): linear in tokens and in
blocks x width, checked against FLUX- and SD3-shaped models twice as wide and deep as the measured
``small_flux`` and ``small_sd3`` (``python -m benchmarks.memory_plan transformer-scaling``, saved in
``benchmarks/results/transformer_scaling.json``), which the shipped table does not hold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdcluster.plan.activations import TABLE, activation_bytes, tokens_at
from tests.conftest import REPO

SAVED = json.loads((REPO / "benchmarks" / "results" / "transformer_scaling.json").read_text())
CASES = [(model, m) for model in SAVED["models"] for m in model["measured"]]


def _estimate(model: dict, m: dict, path: Path = TABLE):
    return activation_bytes(
        model["family"],
        model["denoiser_params"],
        model["width"],
        m["resolution"],
        m["batch"],
        m["checkpointing"],
        path=path,
        sequence=tuple(model["sequence"]),
    )


@pytest.mark.parametrize(("model", "m"), CASES, ids=lambda v: str(v.get("model", v.get("resolution"))))
def test_a_wider_deeper_transformers_forward_is_estimated_from_the_small_one(model, m):
    """Within 5% without gradient checkpointing; with it, above by less than 30% (the forward then holds
    each block's input, which grows with depth, and one block's work, which does not): never below."""
    got = _estimate(model, m)
    small = model["model"].replace("medium", "small")
    assert got.basis.startswith(f"estimated from the measured {small}") and "blocks x width" in got.basis
    error = got.forward / m["forward"] - 1
    if m["checkpointing"]:
        assert 0 <= error < 0.30, error
    else:
        assert abs(error) < 0.05, error


def test_another_resolution_is_scaled_by_tokens_not_pixels(tmp_path):
    """With only the 128 px entries, 256 px is estimated by the tokens' ratio (FLUX: 768 / 576, where the
    pixels' would be 4) and matches the 256 px measurement of the wider, deeper model within 5%."""
    table = json.loads(TABLE.read_text())
    table["entries"] = [e for e in table["entries"] if e["resolution"] == 128]
    path = tmp_path / "activations.json"
    path.write_text(json.dumps(table))
    for model in SAVED["models"]:
        for m in model["measured"]:
            if m["resolution"] != 256 or m["checkpointing"]:
                continue
            got = _estimate(model, m, path)
            assert "by its tokens" in got.basis
            assert abs(got.forward / m["forward"] - 1) < 0.05
    assert tokens_at((16, 512), 256) / tokens_at((16, 512), 128) == 768 / 576


@pytest.mark.parametrize(("model", "measured"), [("tiny_flux", "small_flux"), ("tiny_sd3", "small_sd3")])
def test_a_transformer_is_planned_from_its_own_family_not_a_unet_of_its_width(make_cfg, model, measured):
    """The tiny FLUX's width is the tiny UNet's first block's (32): its plan is still its family's."""
    from sdcluster.plan.fit import plan_config

    planned = plan_config(make_cfg([f"model={model}"]))
    assert planned.sizes.token_sequence is not None and planned.plan.parts["activations"] > 0
    assert f"estimated from the measured {measured} " in planned.plan.activations.basis
