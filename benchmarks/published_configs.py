"""The published component configs of SD 1.5 and SDXL base 1.0, written as a config-only pipeline folder.

The memory plan (:mod:`sdcluster.plan.sizes`) reads a model folder's ``model_index.json`` and each
component's ``config.json`` and builds the components on torch's meta device: no weight file and no
tokenizer is read. So a folder of the published configs alone plans SD 1.5 and SDXL exactly as their
downloads would, with no model hub (``benchmarks/recipe_table.py`` plans its table on them).

SD 1.x: the literal configs of :mod:`benchmarks.true_size_model` (``runwayml/stable-diffusion-v1-5``
publishes SD 1.4's values). SDXL: copied from ``stabilityai/stable-diffusion-xl-base-1.0``'s
``unet/config.json``, ``vae/config.json``, ``text_encoder/config.json``, ``text_encoder_2/config.json``,
``scheduler/scheduler_config.json`` and ``model_index.json``; keys that only record the writing library's
version are left out, keys whose value is the library's default are kept as published where they decide a
shape. Parameters on the meta device (``python -m benchmarks.published_configs``) match the published
sizes: SD 1.5 UNet 859.5M, VAE 83.7M, CLIP ViT-L text encoder 123.1M; SDXL UNet 2567.5M, the same CLIP-L
123.1M, OpenCLIP ViT-bigG text encoder 694.7M.

    python -m benchmarks.published_configs [DEST]   # write both folders, print each component's parameters
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.true_size_model import SD1_PNDM, SD1_TEXT, SD1_UNET, SD1_VAE

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# stabilityai/stable-diffusion-xl-base-1.0, vae/config.json (SD 1.x's VAE architecture, its own weights)
SDXL_VAE: dict[str, Any] = {
    **SD1_VAE,
    "force_upcast": True,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}

# text_encoder/config.json of both: CLIP ViT-L/14's text tower (SDXL's first encoder is SD 1.x's)
CLIP_L_TEXT: dict[str, Any] = {
    **SD1_TEXT,
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
}

# stabilityai/stable-diffusion-xl-base-1.0, text_encoder_2/config.json: OpenCLIP ViT-bigG/14's text tower
SDXL_TEXT_2: dict[str, Any] = {
    "architectures": ["CLIPTextModelWithProjection"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "vocab_size": 49408,
}

# stabilityai/stable-diffusion-xl-base-1.0, scheduler/scheduler_config.json
SDXL_EULER: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

_D, _T = "diffusers", "transformers"

# name -> (model_index.json, {component folder: (config file, class, config)})
PUBLISHED: dict[str, tuple[dict[str, Any], dict[str, tuple[str, str, dict[str, Any]]]]] = {
    "sd15": (
        {
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [_T, "CLIPImageProcessor"],
            "requires_safety_checker": True,
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
            "scheduler": [_D, "PNDMScheduler"],
            "text_encoder": [_T, "CLIPTextModel"],
            "tokenizer": [_T, "CLIPTokenizer"],
            "unet": [_D, "UNet2DConditionModel"],
            "vae": [_D, "AutoencoderKL"],
        },
        {
            "unet": ("config.json", "UNet2DConditionModel", SD1_UNET),
            "vae": ("config.json", "AutoencoderKL", SD1_VAE),
            "text_encoder": ("config.json", "", CLIP_L_TEXT),
            "scheduler": ("scheduler_config.json", "PNDMScheduler", SD1_PNDM),
        },
    ),
    "sdxl": (
        {
            "_class_name": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": True,
            "scheduler": [_D, "EulerDiscreteScheduler"],
            "text_encoder": [_T, "CLIPTextModel"],
            "text_encoder_2": [_T, "CLIPTextModelWithProjection"],
            "tokenizer": [_T, "CLIPTokenizer"],
            "tokenizer_2": [_T, "CLIPTokenizer"],
            "unet": [_D, "UNet2DConditionModel"],
            "vae": [_D, "AutoencoderKL"],
        },
        {
            "unet": ("config.json", "UNet2DConditionModel", SDXL_UNET),
            "vae": ("config.json", "AutoencoderKL", SDXL_VAE),
            "text_encoder": ("config.json", "", CLIP_L_TEXT),
            "text_encoder_2": ("config.json", "", SDXL_TEXT_2),
            "scheduler": ("scheduler_config.json", "EulerDiscreteScheduler", SDXL_EULER),
        },
    ),
}


def write_config_folder(name: str, dest: Path) -> Path:
    """Write ``name``'s (``sd15`` or ``sdxl``) model_index.json and component configs under ``dest``."""
    index, components = PUBLISHED[name]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for folder, (file, cls, config) in components.items():
        (dest / folder).mkdir(exist_ok=True)
        record = {"_class_name": cls, **config} if cls else config  # diffusers' configs name their class
        (dest / folder / file).write_text(json.dumps(record, indent=2) + "\n")
    return dest


def parameter_counts(folder: Path) -> dict[str, int]:
    """Parameters of each weighted component built from its config on the meta device."""
    import importlib

    import torch

    index = json.loads((folder / "model_index.json").read_text())
    counts = {}
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if part not in index:
            continue
        library, cls_name = index[part]
        cls = getattr(importlib.import_module(library), cls_name)
        with torch.device("meta"):
            if hasattr(cls, "load_config"):
                module = cls.from_config(cls.load_config(folder, subfolder=part))
            else:
                module = cls(cls.config_class.from_pretrained(folder, subfolder=part))
        counts[part] = sum(p.numel() for p in module.parameters())
    return counts


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="published-"))
    for model in PUBLISHED:
        folder = write_config_folder(model, root / model)
        counts = parameter_counts(folder)
        print(folder, {part: f"{n / 1e6:.1f}M" for part, n in counts.items()})
