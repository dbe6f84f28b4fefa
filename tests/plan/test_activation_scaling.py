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


GPU_PARAMS, COPIES = 860_000_000, 1_720_000_000  # a true-size SD 1.x: autocast's bf16 copies, 2 bytes each


def _gpu_entry(checkpointing: bool, bytes_: dict[str, int], forward: dict[str, int]) -> dict:
    return {
        "model": "sd1_true",
        "family": "sd1",
        "denoiser_params": GPU_PARAMS,
        "width": 320,
        "resolution": 512,
        "gradient_checkpointing": checkpointing,
        "bytes": bytes_,
        "forward": forward,
        "precision": "bf16",
        "autocast_copies": COPIES,
    }


@pytest.fixture
def gpu_table(tmp_path: Path) -> Path:
    """A float32 CPU entry of SD 1.x at 256 px and its bf16 GPU entries at 512 px (batches 1, 2, 8), with and
    without gradient checkpointing; a float32 entry of a tiny SDXL."""
    cpu = {**_entry("sd1_true", "sd1", GPU_PARAMS, 320, 256, 3_000_000), "forward": {"1": 5, "2": 10}}
    entries = [
        cpu,
        _entry("tiny_sdxl", "sdxl", SMALL, 32, 128, 7000),
        _gpu_entry(False, {"1": 400, "2": 900, "8": 9000}, {"1": 3000, "2": 4200, "8": 11_700}),
        _gpu_entry(True, {"1": 200, "2": 360, "8": 1200}, {"1": 400, "2": 600, "8": 1700}),
    ]
    path = tmp_path / "activations.json"
    path.write_text(json.dumps({"entries": entries}))
    return path


def test_half_precision_runs_take_their_family_s_gpu_entries_and_float32_runs_the_cpu_ones(
    gpu_table: Path,
) -> None:
    half = activation_bytes("sd1", GPU_PARAMS, 320, 512, 2, False, half=True, path=gpu_table)
    assert half.bytes == 900 and half.basis == "measured on a GPU in bf16"
    assert half.holds_autocast_copies  # the plan then counts no copies with the weights
    full = activation_bytes("sd1", GPU_PARAMS, 320, 512, 2, False, path=gpu_table)
    assert full.bytes == 3_000_000 * 2 * 4 and "scaled from 256 px" in full.basis
    assert not full.holds_autocast_copies
    # SDXL has no GPU entry here: its half-precision run takes its float32 entry (an upper bound)
    sdxl = activation_bytes("sdxl", SMALL, 32, 128, 1, False, half=True, path=gpu_table)
    assert (sdxl.bytes, sdxl.basis) == (7000, "measured") and not sdxl.holds_autocast_copies


def test_a_micro_batch_between_or_beyond_the_measured_ones_is_on_the_line_through_its_neighbours(
    gpu_table: Path,
) -> None:
    def at(batch: int) -> int:
        return activation_bytes("sd1", GPU_PARAMS, 320, 512, batch, False, half=True, path=gpu_table).bytes

    assert [at(1), at(2), at(8)] == [400, 900, 9000]  # as measured, not a line through 1 and 8
    assert at(4) == 900 + 2 * (9000 - 900) // 6  # between 2 and 8
    assert at(10) == 9000 + 2 * (9000 - 900) // 6  # beyond 8: the last segment


def test_autocast_copies_alive_at_the_forward_s_end_count_for_a_full_fine_tune_and_not_for_lora(
    gpu_table: Path,
) -> None:
    """With gradient checkpointing autocast's copies are not saved, yet alive until its context ends: a full
    fine-tune accumulating gradients peaks there, with them. A LoRA step's frozen base makes none: without
    checkpointing the saved copies come off its figures."""
    full = activation_bytes("sd1", GPU_PARAMS, 320, 512, 1, True, half=True, path=gpu_table)
    assert full.unsaved_copies == COPIES
    grads = 3_440_000_000
    at_forward = full.above_gradients(grads, grads)  # the earlier micro-steps' gradients are alive
    assert at_forward.bytes == 400 + COPIES and at_forward.basis.startswith("at the forward's end")
    assert full.above_gradients(grads, 0).bytes == 200  # no accumulation: late in the backward pass
    plain = activation_bytes("sd1", GPU_PARAMS, 320, 512, 1, False, half=True, path=gpu_table)
    assert plain.unsaved_copies == 0  # saved for the backward: inside ``forward`` already
    lora = activation_bytes("sd1", GPU_PARAMS, 320, 512, 8, False, half=True, adapters=True, path=gpu_table)
    assert (lora.bytes, lora.forward) == (max(9000 - COPIES, 0), max(11_700 - COPIES, 0))
    assert not lora.holds_autocast_copies and lora.unsaved_copies == 0
    lora_ckpt = activation_bytes(
        "sd1", GPU_PARAMS, 320, 512, 8, True, half=True, adapters=True, path=gpu_table
    )
    assert (lora_ckpt.bytes, lora_ckpt.forward) == (1200, 1700)
