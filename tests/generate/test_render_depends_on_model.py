"""Generation really uses its inputs: the prompt, the scheduler and the weights of the model it is given.

The other generation tests check reproducibility (same inputs, same pixels); a generator that ignored its
prompt, its scheduler or its model would pass them all. Here changing one input must change the pixels, and
an image made from a fine-tuned export must be exactly what plain diffusers makes from that export with the
settings and seed in the manifest record (batch size 1 on both sides, so the batch shape is the same and the
bytes must match).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdcluster.config import Config, GenerateConfig
from sdcluster.generate import records
from sdcluster.generate.job import generate_images

pytestmark = pytest.mark.slow

PROMPT = "dark blue jeans laid flat on a white background"
OTHER_PROMPT = "a red sports car parked on a wet street at night"
SETTINGS = {"num_images": 1, "batch_size": 1, "steps": 3, "height": 64, "width": 64, "guidance_scale": 7.5}
TRAIN = [
    "train.max_steps=3",
    "train.batch_size=2",
    "train.log_every=1",
    "train.checkpoint_every=100",
    "train.validation_prompts=[]",
    "optim.lr=1e-2",  # high, so that three steps move the weights visibly
    f"generate.prompts=[{PROMPT}]",
    *(f"generate.{key}={value}" for key, value in SETTINGS.items()),
]


def gen_cfg(root: Path, model: Path, prompt: str = PROMPT, **gen: object) -> Config:
    settings: dict = {**SETTINGS, "prompts": [prompt], **gen}
    return Config(generate=GenerateConfig(model=str(model), **settings), output_root=str(root))


def only_image(cfg: Config) -> tuple[dict, np.ndarray]:
    """Generate the one image of ``cfg``; its manifest record and its pixels as read back from the PNG."""
    result = generate_images(cfg)
    assert (result.generated, result.total) == (1, 1)
    (record,) = records.read_image_manifest(result.out_dir)
    with Image.open(result.out_dir / record["file"]) as image:
        return record, np.asarray(image.convert("RGB")).astype(np.int16)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


@pytest.fixture(scope="module")
def base_image(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, np.ndarray]:
    return only_image(gen_cfg(tmp_path_factory.mktemp("base"), tiny_model))


def test_base_image_is_a_real_image(base_image) -> None:
    record, pixels = base_image
    assert pixels.shape == (64, 64, 3)
    assert pixels.std() > 1  # not a constant (e.g. black) frame
    assert (record["prompt"], record["scheduler"], record["steps"]) == (PROMPT, "ddim", 3)


def test_only_the_prompt_changes_so_the_pixels_change(tiny_model, tmp_path, base_image) -> None:
    record, pixels = base_image
    other_record, other = only_image(gen_cfg(tmp_path, tiny_model, prompt=OTHER_PROMPT))
    assert other_record["prompt"] == OTHER_PROMPT
    assert other_record["seed"] == record["seed"]  # same seed: the prompt is the only difference
    assert mean_abs_diff(pixels, other) > 1.0


@pytest.mark.filterwarnings(
    "ignore:__array__ implementation:DeprecationWarning"
)  # diffusers' Euler + numpy 2
def test_only_the_scheduler_changes_so_the_pixels_change(tiny_model, tmp_path, base_image) -> None:
    record, pixels = base_image
    other_record, other = only_image(gen_cfg(tmp_path, tiny_model, scheduler="euler_a"))
    assert other_record["scheduler"] == "euler_a"
    assert other_record["seed"] == record["seed"]
    assert mean_abs_diff(pixels, other) > 1.0


def plain_diffusers(model: Path, record: dict) -> np.ndarray:
    """What diffusers alone makes from ``model`` with the manifest record's settings and seed."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    assert record["scheduler"] == "ddim" and record["generator"] == "cpu"
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    # As sdcluster does it: the sampling algorithm changes, the model's own scheduler config carries over.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        record["prompt"],
        negative_prompt=record["negative_prompt"],
        generator=torch.Generator("cpu").manual_seed(record["seed"]),
        num_inference_steps=record["steps"],
        guidance_scale=record["guidance_scale"],
        height=record["height"],
        width=record["width"],
    ).images[0]
    return np.asarray(image.convert("RGB")).astype(np.int16)


def test_fine_tuned_export_is_what_generation_uses(make_cfg, tiny_model, base_image) -> None:
    from sdcluster.train.loop import train

    cfg = make_cfg(TRAIN)
    result = train(cfg)
    assert result.model_dir is not None and not result.interrupted
    assert cfg.generate.model is None  # generation uses the run's own export
    record, tuned = only_image(cfg)
    assert record["model"] == str(result.model_dir)

    base_record, base = base_image
    assert base_record["seed"] == record["seed"] and base_record["prompt"] == record["prompt"]
    assert mean_abs_diff(tuned, base) > 1.0  # the fine-tuned weights, not the base model's

    # The base model under the same config (only generate.model differs) gives the base image again, so the
    # difference above comes from the weights and from nothing else in the training config.
    again_cfg = dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate, model=str(tiny_model)))
    _, again = only_image(again_cfg)
    assert np.array_equal(again, base)

    assert np.array_equal(plain_diffusers(result.model_dir, record), tuned)
