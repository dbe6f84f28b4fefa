"""A prompt program's per-template ``guidance_scale`` reaches the pipeline.

The expectation is a direct diffusers call with the value written in the program (not the manifest's, and
not sdcluster's ``render``), so a template value that was recorded but never passed on fails here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdcluster.config import GenerateConfig
from sdcluster.generate import records
from sdcluster.generate.job import generate_images
from tests.generate.conftest import program_cfg, write_program

pytestmark = pytest.mark.slow

TEXT = "dark blue jeans laid flat on a white background"
GUIDANCE = 3.0  # written in the program below; the config's default differs
PROGRAM = f"""
templates:
  - text: "{TEXT}"
    images: 1
    guidance_scale: {GUIDANCE}
"""


def diffusers_pixels(model: Path, seed: int, guidance_scale: float, steps: int) -> np.ndarray:
    """diffusers alone, DDIM (sdcluster's default sampler, the model's scheduler config carried over)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        TEXT,
        generator=torch.Generator("cpu").manual_seed(seed),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=64,
        width=64,
    ).images[0]
    return np.asarray(image.convert("RGB")).astype(np.int16)


def test_a_templates_guidance_scale_is_what_the_pipeline_samples_with(tiny_model, tmp_path):
    assert GenerateConfig.guidance_scale != GUIDANCE
    program = write_program(tmp_path, PROGRAM)
    cfg = program_cfg(tmp_path / "out", tiny_model, program, batch_size=1)
    result = generate_images(cfg)
    assert (result.generated, result.total) == (1, 1)
    (record,) = records.read_image_manifest(result.out_dir)
    assert (record["prompt"], record["guidance_scale"]) == (TEXT, GUIDANCE)
    with Image.open(result.out_dir / record["file"]) as image:
        made = np.asarray(image.convert("RGB")).astype(np.int16)

    steps = cfg.generate.steps
    expected = diffusers_pixels(tiny_model, record["seed"], GUIDANCE, steps)
    assert np.array_equal(made, expected)
    # the value matters: the config's default guidance gives a visibly other image
    default = diffusers_pixels(tiny_model, record["seed"], GenerateConfig.guidance_scale, steps)
    assert np.abs(default - expected).max() > 4
