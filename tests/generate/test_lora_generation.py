"""Generation with a LoRA (``generate.lora``) puts it on at ``generate.lora_scale``, on SD 1.x and on SDXL.

The expected images come from diffusers alone: the base pipeline, ``load_lora_weights`` and, for a scale,
``fuse_lora(lora_scale=s)``, which folds W + s * dW into the weights. A generator that treated the scale as
on/off, or that left the LoRA out, gives other pixels. The LoRA file is made here with peft and diffusers'
``save_lora_weights`` (random adapters, alpha != rank), not by sdcluster's export.
"""

from __future__ import annotations

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
SETTINGS = {"num_images": 1, "batch_size": 1, "steps": 3, "height": 64, "width": 64, "prompts": [PROMPT]}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def plain_pipeline(model: Path):
    """The pipeline at ``model`` as a diffusers user loads it, sampling with DDIM (sdcluster's default;
    the model's own scheduler config carried over)."""
    from diffusers import DDIMScheduler, DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(model), use_safetensors=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_lora(model: Path, dest: Path) -> Path:
    """Random UNet adapters for ``model`` (rank 4, alpha 2) in diffusers' LoRA file format."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = plain_pipeline(model)
    config = LoraConfig(r=4, lora_alpha=2, init_lora_weights=False, target_modules=UNET_TARGETS)
    torch.manual_seed(0)
    pipe.unet.add_adapter(config)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    metadata = pipe.unet.peft_config["default"].to_dict()
    type(pipe).save_lora_weights(dest, unet_lora_layers=state, unet_lora_adapter_metadata=metadata)
    return dest / "pytorch_lora_weights.safetensors"


def sdcluster_image(
    root: Path, model: Path, lora: Path | None, scale: float = 1.0
) -> tuple[dict, np.ndarray]:
    """sdcluster's one image of ``model`` (with ``lora`` at ``scale``); its manifest record and pixels."""
    lora_settings = {"lora": str(lora), "lora_scale": scale} if lora is not None else {}
    gen = GenerateConfig(model=str(model), **SETTINGS, **lora_settings)
    result = generate_images(Config(generate=gen, output_root=str(root)))
    assert (result.generated, result.total) == (1, 1)
    (record,) = records.read_image_manifest(result.out_dir)
    with Image.open(result.out_dir / record["file"]) as image:
        return record, np.asarray(image.convert("RGB")).astype(np.int16)


def diffusers_image(model: Path, lora: Path | None, record: dict, fuse_at: float | None = None) -> np.ndarray:
    """What diffusers alone makes of the record's prompt and seed, with ``lora`` loaded (and fused into the
    weights at ``fuse_at`` when given)."""
    pipe = plain_pipeline(model)
    if lora is not None:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        if fuse_at is not None:
            pipe.fuse_lora(lora_scale=fuse_at)
    image = pipe(
        PROMPT,
        generator=torch.Generator("cpu").manual_seed(record["seed"]),
        num_inference_steps=SETTINGS["steps"],
        guidance_scale=GenerateConfig.guidance_scale,
        height=SETTINGS["height"],
        width=SETTINGS["width"],
    ).images[0]
    return np.asarray(image.convert("RGB")).astype(np.int16)


def levels(a: np.ndarray, b: np.ndarray) -> int:
    """The largest difference between two images, in 8-bit grey levels."""
    return int(np.abs(a - b).max())


@pytest.fixture(scope="module")
def sd1_lora(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_lora(tiny_model, tmp_path_factory.mktemp("sd1_lora"))


@pytest.fixture(scope="module")
def tiny_sdxl(cache_root: Path) -> Path:
    from sdcluster.models.embedded import ensure_tiny_model

    return ensure_tiny_model(cache_root, "tiny_sdxl")


def test_lora_scale_is_a_strength_not_a_switch(tiny_model, sd1_lora, tmp_path):
    """Scale 0.5 is diffusers' W + 0.5 * dW: neither the base model (scale 0) nor the whole LoRA (scale 1)."""
    made = {s: sdcluster_image(tmp_path / str(s), tiny_model, sd1_lora, s) for s in (0.0, 0.5, 1.0)}
    record = made[0.5][0]
    assert record["lora_scale"] == 0.5 and all(r["seed"] == record["seed"] for r, _ in made.values())
    pixels = {s: image for s, (_, image) in made.items()}

    base = diffusers_image(tiny_model, None, record)
    assert np.array_equal(pixels[0.0], base)  # scale 0: the base model itself
    assert levels(pixels[1.0], diffusers_image(tiny_model, sd1_lora, record)) == 0
    half = diffusers_image(tiny_model, sd1_lora, record, fuse_at=0.5)
    assert levels(pixels[0.5], half) <= 1  # fused weights round differently, at most a level
    # the three strengths are three different images, each far from the others
    assert min(levels(pixels[0.5], pixels[0.0]), levels(pixels[0.5], pixels[1.0])) > 4


def test_sdxl_generation_puts_the_lora_on(tiny_sdxl, tmp_path):
    """On SDXL too, the LoRA changes the image, and the image is what diffusers' own load gives."""
    lora = write_lora(tiny_sdxl, tmp_path / "lora")
    record, with_lora = sdcluster_image(tmp_path / "with", tiny_sdxl, lora)
    _, without = sdcluster_image(tmp_path / "without", tiny_sdxl, None)
    assert record["lora"] == str(lora)
    assert levels(with_lora, without) > 4
    assert np.array_equal(without, diffusers_image(tiny_sdxl, None, record))
    assert np.array_equal(with_lora, diffusers_image(tiny_sdxl, lora, record))
