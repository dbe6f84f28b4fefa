"""The embedded tiny SDXL (``model=tiny_sdxl``): SDXL's classes and wiring at unit-test size, built offline.

Everything SDXL adds to Stable Diffusion 1.x is here for real, so the tests and the CPU demo take the exact
path ``stabilityai/stable-diffusion-xl-base-1.0`` takes: two text encoders (``CLIPTextModel`` and
``CLIPTextModelWithProjection``) whose penultimate hidden states are concatenated into the cross-attention
input, the second one's pooled projection and the six size/crop numbers feeding the UNet's ``text_time``
embedding, the Euler scheduler, the VAE's SDXL scaling factor and ``force_upcast``, and
``StableDiffusionXLPipeline``'s folder layout. Shapes are diffusers' own SDXL unit-test sizes; weights are
random with fixed seeds; the tokenizers are the tiny model's CLIP vocabulary (the second one pads with
``!``, as SDXL's does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdcluster.models.tiny import MARKER, TINY_TEXT, TINY_VAE, make_vae, text_config, tokenizers

TINY_SDXL_VERSION = "1"

TINY_SDXL_UNET: dict[str, Any] = {
    "sample_size": 8,
    "layers_per_block": 2,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": (1, 2),
    "cross_attention_dim": 64,  # the two encoders' hidden sizes, concatenated
    "projection_class_embeddings_input_dim": 6 * 8 + 32,  # six size/crop numbers x 8, plus the pooled 32
}


def build_tiny_sdxl(dest: Path) -> Path:
    """Write the seeded tiny SDXL pipeline into ``dest``; the marker file is written last."""
    build_sdxl_pipeline(dest, TINY_SDXL_UNET, TINY_VAE, TINY_TEXT)
    (dest / MARKER).write_text(json.dumps({"version": TINY_SDXL_VERSION, "family": "sdxl"}))
    return dest


def build_sdxl_pipeline(dest: Path, unet: dict[str, Any], vae: dict[str, Any], text: dict[str, Any]) -> Path:
    """Write a random-weight SDXL folder of the given shapes to ``dest`` (seeded: reproducible); the
    benchmarks' SDXL-shaped model goes through here too. Both text encoders take the ``text`` shape, so
    ``unet['cross_attention_dim']`` must be twice its hidden size."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    vocab_size, (tokenizer, tokenizer_2) = tokenizers(None, "!")
    torch.manual_seed(0)
    unet_model = UNet2DConditionModel(in_channels=4, out_channels=4, **unet)
    vae_model = make_vae(vae, scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE settings
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config(vocab_size, tokenizer, text))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(vocab_size, tokenizer_2, text))
    scheduler = EulerDiscreteScheduler(  # SDXL base's published scheduler settings
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae_model,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet_model,
        scheduler=scheduler,
    )
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest
