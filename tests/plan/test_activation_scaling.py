"""The activation table's scaling rule on a table written here: a fitted power law only between measured
resolutions, linear in pixels outside them, and another denoiser estimated from the measured one with the
same first-block width (SDXL from SD 1.x's true-size entries)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from sdcluster.plan.activations import activation_bytes

SMALL, BIG = 1_000_000, 860_000_000


def _entry(model: str, family: str, params: int, width: int, resolution: int, one: int) -> dict:
    """An entry whose batch-2 bytes are twice batch 1's: no fixed part, so batch 1 reads ``one`` exactly."""
    return {
        "model": model,
        "family": family,
        "denoiser_params": params,
        "width": width,
        "resolution": resolution,
        "gradient_checkpointing": False,
        "bytes": {"1": one, "2": 2 * one},
    }


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """A tiny sd1 model measured at 64 px and 128 px (bytes x 10 between them: k = log2(10) = 3.32), a tiny
    sdxl model, and a true-size sd1 model measured at 256 px only."""
    entries = [
        _entry("tiny", "sd1", SMALL, 32, 64, 1000),
        _entry("tiny", "sd1", SMALL, 32, 128, 10_000),
        _entry("tiny_sdxl", "sdxl", SMALL, 32, 128, 7000),
        _entry("sd1_true", "sd1", BIG, 320, 256, 3_000_000),
    ]
    path = tmp_path / "activations.json"
    path.write_text(json.dumps({"entries": entries}))
    return path


def test_above_the_largest_measured_resolution_bytes_grow_linearly_in_pixels(table: Path) -> None:
    above = activation_bytes("sd1", SMALL, 32, 256, 1, False, path=table)
    assert above.bytes == 40_000  # 10,000 x (256/128)^2, not the fitted 10,000 x 2^3.32 = 100,000
    assert "scaled from 128 px" in above.basis and "linear in pixels" in above.basis
    below = activation_bytes("sd1", SMALL, 32, 32, 1, False, path=table)
    assert below.bytes == 250  # 1000 x (32/64)^2
    single = activation_bytes("sd1", BIG, 320, 512, 2, False, path=table)
    assert single.bytes == 24_000_000 and single.basis.startswith("scaled from 256 px")


def test_between_measured_resolutions_the_fitted_power_law_applies(table: Path) -> None:
    between = activation_bytes("sd1", SMALL, 32, 80, 1, False, path=table)
    assert between.bytes == round(1000 * (80 / 64) ** math.log2(10))  # from 64 px, the nearer point
    assert "fitted between 64 and 128 px" in between.basis


def test_sdxl_is_estimated_from_the_measured_model_of_its_first_block_width(table: Path) -> None:
    sdxl = activation_bytes("sdxl", 2_567_000_000, 320, 1024, 1, False, path=table)
    assert sdxl.bytes == 3_000_000 * 16  # 256 -> 1024 px, linear in pixels, x1 channels
    assert sdxl.basis.startswith("estimated from the measured sd1_true") and "x1.00 channels" in sdxl.basis
    tiny_sdxl = activation_bytes("sdxl", SMALL, 32, 128, 1, False, path=table)
    assert (tiny_sdxl.bytes, tiny_sdxl.basis) == (7000, "measured")  # its own family's model of its width
    assert activation_bytes("sd3", BIG, 320, 512, 1, False, path=table).bytes == 0  # no entry of its family
