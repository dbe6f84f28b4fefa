"""The embedded tiny SD3 (``model=tiny_sd3``): Stable Diffusion 3.5's classes and wiring, test-sized, offline.

Everything SD 3.5 has that SD 1.x and SDXL lack is here for real, so the tests and the CPU demo take the path
``stabilityai/stable-diffusion-3.5-medium`` takes: an MMDiT denoiser (``SD3Transformer2DModel``, patch size
2), three text encoders (two ``CLIPTextModelWithProjection`` whose penultimate hidden states are concatenated
and padded to the T5 width, their pooled projections concatenated, and a ``T5EncoderModel`` whose sequence
follows the CLIP one), the 16-channel VAE with SD3's shift and scaling factors and no quant convolutions,
the flow-matching Euler scheduler with SD 3.5's shift of 3, and ``StableDiffusion3Pipeline``'s folder
layout. Weights are random with fixed seeds; the CLIP tokenizers are the tiny model's vocabulary (the second
pads with ``!`` as SD3's does), the T5 tokenizer is :mod:`sdcluster.models.tiny_t5`'s.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sdcluster.models.tiny import MARKER, TINY_TEXT, TINY_VAE, make_vae, text_config, tokenizers
from sdcluster.models.tiny_t5 import write_t5_tokenizer

TINY_SD3_VERSION = "1"

SD3_VAE: dict[str, Any] = {  # SD 3.x's published VAE settings (its config.json)
    "latent_channels": 16,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
TINY_SD3_TRANSFORMER: dict[str, Any] = {
    "sample_size": 8,  # latents of 64 px images
    "patch_size": 2,
    "num_layers": 2,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "caption_projection_dim": 32,
    "joint_attention_dim": 64,  # the T5 width, which the two CLIP widths (32 + 32) are padded to
    "pooled_projection_dim": 64,  # the two CLIP projections (32 + 32), concatenated
    "out_channels": 16,
    "pos_embed_max_size": 16,
}
TINY_T5: dict[str, Any] = {
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 37,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "feed_forward_proj": "gated-gelu",  # T5 v1.1, the T5-XXL SD3 ships
}


def build_tiny_sd3(dest: Path) -> Path:
    """Write the seeded tiny SD3 pipeline into ``dest``; the marker file is written last."""
    build_sd3_pipeline(dest, TINY_SD3_TRANSFORMER, TINY_VAE, TINY_TEXT, TINY_T5)
    (dest / MARKER).write_text(json.dumps({"version": TINY_SD3_VERSION, "family": "sd3"}))
    return dest


def t5_encoder(tokenizer: Any, shape: dict[str, Any]) -> Any:
    """A random ``T5EncoderModel`` of ``shape`` for ``tokenizer``'s vocabulary (seeded)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **shape,
    )
    torch.manual_seed(2)
    return T5EncoderModel(config)


def sd3_vae(shape: dict[str, Any]) -> Any:
    """SD3's VAE (16 latent channels, shift and scale, no quant convolutions) of ``shape``, seeded."""
    return make_vae(shape, **SD3_VAE)


def build_sd3_pipeline(
    dest: Path,
    transformer: dict[str, Any],
    vae: dict[str, Any],
    text: dict[str, Any],
    t5: dict[str, Any],
) -> Path:
    """Write a random-weight SD3 folder of the given shapes to ``dest`` (seeded: reproducible). Both CLIP
    encoders take the ``text`` shape: ``transformer['pooled_projection_dim']`` is twice its projection size
    and ``joint_attention_dim`` the T5 ``d_model``, at least twice the CLIP hidden size."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    vocab_size, (tokenizer, tokenizer_2) = tokenizers(None, "!")
    work = Path(tempfile.mkdtemp(prefix="t5tok-"))
    try:
        tokenizer_3 = write_t5_tokenizer(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    torch.manual_seed(0)
    denoiser = SD3Transformer2DModel(in_channels=SD3_VAE["latent_channels"], **transformer)
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(text_config(vocab_size, tokenizer, text))
    torch.manual_seed(1)
    text_encoder_2 = CLIPTextModelWithProjection(text_config(vocab_size, tokenizer_2, text))
    pipe = StableDiffusion3Pipeline(
        transformer=denoiser,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),  # SD 3.5's
        vae=sd3_vae(vae),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=t5_encoder(tokenizer_3, t5),
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest
