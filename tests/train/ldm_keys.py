"""The key names of the published single-file checkpoints, derived once and recorded in ``tests/train/data/``.

    python -m tests.train.ldm_keys      # rewrites tests/train/data/ldm_keys_*.txt

SD 1.5 (``v1-5-pruned-emaonly.safetensors``) and SDXL base (``sd_xl_base_1.0.safetensors``) are built at
their published sizes on the meta device (names and shapes, no weights, no download); their diffusers
weight names are written in the original layout, and each name is kept only because diffusers' own loader
(``diffusers.loaders.single_file_utils``: ``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``,
``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``, the tables ``from_single_file`` uses)
maps the whole set back onto exactly the diffusers model's names, one to one: :func:`loader_round_trip`.
Published files may also hold tensors that are not weights (the DDPM schedule, CLIP's ``position_ids``,
OpenCLIP's ``logit_scale``, ``model_ema`` counters): every loader drops them, so they are only named in
the header (:data:`NOT_WEIGHTS`, as stable-diffusion.cpp's ``unused_tensors`` list names them). What this
does not prove: that the published file holds no other weight; the names come from diffusers' loader, not
from the file's own header (no download here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"

SD15_UNET = {"cross_attention_dim": 768, "sample_size": 64}  # the rest: UNet2DConditionModel's defaults
SDXL_UNET = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
CLIP_G = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
NOT_WEIGHTS = {
    "sd15": [
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "betas",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "log_one_minus_alphas_cumprod",
        "model_ema.decay",
        "model_ema.num_updates",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "posterior_variance",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
    ],
    "sdxl_base": [
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.1.model.logit_scale",
    ],
}
PUBLISHED = {"sd15": "v1-5-pruned-emaonly.safetensors", "sdxl_base": "sd_xl_base_1.0.safetensors"}


def meta_components(name: str) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Component name -> (a model of the published size on the meta device, its config)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**(SD15_UNET if name == "sd15" else SDXL_UNET))
        parts = {
            "unet": unet,
            "vae": AutoencoderKL(**VAE),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        }
        if name == "sdxl_base":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
    # transformers' configs are objects, diffusers' are dicts: the writers read them as dicts
    configs = {part: getattr(m.config, "to_dict", lambda m=m: dict(m.config))() for part, m in parts.items()}
    return {part: (model, configs[part]) for part, model in parts.items()}


def written_state(name: str) -> dict[str, Any]:
    """The published-size model in the original layout, as the export writes it (meta tensors)."""
    from sdcluster.train.single_file import LAYOUTS

    pipeline = {"sd15": "StableDiffusionPipeline", "sdxl_base": "StableDiffusionXLPipeline"}[name]
    state: dict[str, Any] = {}
    for part, (model, config) in meta_components(name).items():
        state.update(LAYOUTS[pipeline][part](model.state_dict(), config))
    return state


def loader_round_trip(name: str, state: dict[str, Any]) -> dict[str, tuple[set[str], set[str]]]:
    """Per component, (diffusers names diffusers' loader makes of ``state`` that the model lacks, model
    names it does not make): both empty when the single-file names are the ones diffusers reads."""
    from diffusers.loaders import single_file_utils as sfu

    comps = meta_components(name)
    made = {
        "unet": sfu.convert_ldm_unet_checkpoint(state, comps["unet"][1]),
        "vae": sfu.convert_ldm_vae_checkpoint(state, comps["vae"][1]),
    }
    clip_prefix = (
        "cond_stage_model.transformer." if name == "sd15" else "conditioner.embedders.0.transformer."
    )
    clip = {k: v for k, v in state.items() if k.startswith(clip_prefix)}
    made["text_encoder"] = {
        k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(clip).items()
    }
    if name == "sdxl_base":
        model = comps["text_encoder_2"][0]
        made["text_encoder_2"] = sfu.convert_open_clip_checkpoint(
            model, state, "conditioner.embedders.1.model."
        )
    return {
        part: (set(made[part]) - set(m.state_dict()), set(m.state_dict()) - set(made[part]))
        for part, (m, _) in comps.items()
    }


def recorded(name: str) -> list[str]:
    """The recorded weight names of a published file (comment lines and the non-weights left out)."""
    lines = (DATA / f"ldm_keys_{name}.txt").read_text().splitlines()
    return [line for line in lines if line and not line.startswith("#")]


def main() -> None:
    for name, file in PUBLISHED.items():
        state = written_state(name)
        assert not any(a or b for a, b in loader_round_trip(name, state).values()), name
        header = [
            f"# The weight names of {file}, the published single-file checkpoint of {name}.",
            "# Source: diffusers' single-file loader (diffusers.loaders.single_file_utils, 0.42).",
            "# The names were written by sdcluster's writer from the diffusers model of the published",
            "# size (meta device) and recorded only because that loader maps them, all together, onto",
            "# exactly that model's weights, one to one (tests/train/ldm_keys.py: loader_round_trip).",
            "# Not read from the published file itself. Published files may also hold non-weight",
            "# tensors, which every loader drops (not listed below), e.g.:",
            *[f"#   {key}" for key in NOT_WEIGHTS[name]],
            "# Regenerate: python -m tests.train.ldm_keys",
        ]
        (DATA / f"ldm_keys_{name}.txt").write_text("\n".join([*header, *sorted(state)]) + "\n")


if __name__ == "__main__":
    main()
