"""The embedded tiny FLUX (``model=tiny_flux``): FLUX.1-dev's classes and wiring, test-sized, offline.

Everything FLUX.1 has that the other families lack is here for real, so the tests and the CPU demo take the
path ``black-forest-labs/FLUX.1-dev`` takes: a ``FluxTransformer2DModel`` (double- and single-stream blocks,
rotary image and text ids, 2x2 packed latents: 64 input channels for the VAE's 16) with the guidance
embedding of the guidance-distilled dev model, a ``CLIPTextModel`` whose pooled output is the pooled
projection, a ``T5EncoderModel`` whose sequence is the text, the 16-channel VAE with FLUX's shift and scaling
factors and no quant convolutions, the flow-matching Euler scheduler with FLUX.1-dev's config (dynamic
shifting by image size), and ``FluxPipeline``'s folder layout. Weights are random with fixed seeds; the CLIP
tokenizer is the tiny model's vocabulary, the T5 tokenizer :mod:`sdcluster.models.tiny_t5`'s at FLUX's 512
tokens.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from sdcluster.models.tiny import MARKER, TINY_TEXT, TINY_VAE, make_vae, text_config, tokenizers
from sdcluster.models.tiny_sd3 import TINY_T5, t5_encoder
from sdcluster.models.tiny_t5 import write_t5_tokenizer

TINY_FLUX_VERSION = "1"

FLUX_VAE: dict[str, Any] = {  # FLUX.1's published VAE settings (its vae/config.json)
    "latent_channels": 16,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
FLUX_DEV_SCHEDULER: dict[str, Any] = {  # FLUX.1-dev's scheduler/scheduler_config.json
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
FLUX_T5_TOKENS = 512
"""FLUX.1-dev's T5 tokenizer length (its ``tokenizer_2`` ``model_max_length``), which the tiny one keeps."""
TINY_FLUX_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4 * FLUX_VAE["latent_channels"],  # 2x2 patches of latents, packed into channels
    "num_layers": 1,  # double-stream (MMDiT) blocks
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,  # the T5 width
    "pooled_projection_dim": 32,  # CLIP's hidden size: its pooled output is the pooled projection
    "guidance_embeds": True,  # FLUX.1-dev (guidance-distilled); schnell has none
    "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim, as FLUX's (16, 56, 56) sums to 128
}


def build_tiny_flux(dest: Path) -> Path:
    """Write the seeded tiny FLUX pipeline into ``dest``; the marker file is written last."""
    build_flux_pipeline(dest, TINY_FLUX_TRANSFORMER, TINY_VAE, TINY_TEXT, TINY_T5)
    (dest / MARKER).write_text(json.dumps({"version": TINY_FLUX_VERSION, "family": "flux"}))
    return dest


def flux_vae(shape: dict[str, Any]) -> Any:
    """FLUX's VAE (16 latent channels, shift and scale, no quant convolutions) of ``shape``, seeded."""
    return make_vae(shape, **FLUX_VAE)


def build_flux_pipeline(
    dest: Path,
    transformer: dict[str, Any],
    vae: dict[str, Any],
    text: dict[str, Any],
    t5: dict[str, Any],
) -> Path:
    """Write a random-weight FLUX folder of the given shapes to ``dest`` (seeded: reproducible):
    ``transformer['pooled_projection_dim']`` is the CLIP hidden size, ``joint_attention_dim`` the T5
    ``d_model``."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    vocab_size, (tokenizer,) = tokenizers(None)
    work = Path(tempfile.mkdtemp(prefix="t5tok-"))
    try:
        tokenizer_2 = write_t5_tokenizer(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tokenizer_2.model_max_length = FLUX_T5_TOKENS
    torch.manual_seed(0)
    denoiser = FluxTransformer2DModel(**transformer)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config(vocab_size, tokenizer, text))
    pipe = FluxPipeline(
        transformer=denoiser,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        vae=flux_vae(vae),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=t5_encoder(tokenizer_2, t5),
        tokenizer_2=tokenizer_2,
    )
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest
