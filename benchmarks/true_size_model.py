"""Stable Diffusion 1.x at its true size, built offline: SD 1.4/1.5's exact component configs, random weights.

The shapes decide what the benchmarks measure (FLOPs, activation and optimizer memory, checkpoint bytes),
not the weight values, so a seeded random-weight copy of SD 1.x measures what the real one would, with no
model hub. Same classes and folder layout as the published pipeline, so sdcluster loads it with
``model.path=<folder>`` like any downloaded SD 1.x.

The configs below are copied literally from the published ``config.json`` files of
``CompVis/stable-diffusion-v1-4`` (``unet/config.json``, ``vae/config.json``, ``text_encoder/config.json``,
``scheduler/scheduler_config.json``); ``runwayml/stable-diffusion-v1-5`` publishes the same values (1.5 is
1.4's architecture trained longer). Keys that only record the writing library's version are left out.

The tokenizer is a real CLIP BPE tokenizer built like the embedded tiny model's (merges learned from the
sample captions, :func:`sdcluster.models.tiny.write_tokenizer`), padded with unused placeholder entries to
SD 1.x's 49,408-entry vocabulary so that ``<|startoftext|>`` is 49406 and ``<|endoftext|>`` 49407 as in
``openai/clip-vit-large-patch14``: the text model's embedding table, and the ids the UNet's conditioning
comes from, have SD 1.x's sizes. Captions tokenize into more pieces than with the real 48,894 merges, which
changes nothing measured here (every prompt is padded to 77 positions anyway).

    python -m benchmarks.true_size_model [DEST]     # build (or find) it and print where it is (about 4 GiB)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

VERSION = "1"
MARKER = "sdcluster-true-size.json"

# CompVis/stable-diffusion-v1-4, unet/config.json
SD1_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# CompVis/stable-diffusion-v1-4, vae/config.json
SD1_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# CompVis/stable-diffusion-v1-4, text_encoder/config.json (CLIP ViT-L/14's text tower)
SD1_TEXT: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# CompVis/stable-diffusion-v1-4, scheduler/scheduler_config.json (what generation uses by default)
SD1_PNDM: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# The training noise schedule: diffusers' training scripts (and sdcluster.models.load) build a DDPMScheduler
# from the PNDM config above, which yields exactly these values (the same betas, no sample clipping).
SD1_DDPM: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

CLIP_BOS, CLIP_EOS = 49406, 49407  # openai/clip-vit-large-patch14's <|startoftext|>, <|endoftext|>


def write_padded_tokenizer(dest: Path, vocab_size: int = SD1_TEXT["vocab_size"]) -> Any:
    """The tiny model's CLIP tokenizer, its vocabulary padded to ``vocab_size`` with CLIP's special ids.

    Placeholder entries (``<|unused_N|>``) are never produced: BPE only emits pieces its merges build.
    """
    from transformers import CLIPTokenizer

    from sdcluster.models.tiny import write_tokenizer

    write_tokenizer(dest)
    vocab: dict[str, int] = json.loads((dest / "vocab.json").read_text())
    specials = ("<|startoftext|>", "<|endoftext|>")
    pieces = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if tok not in specials]
    filler = [f"<|unused_{i}|>" for i in range(vocab_size - len(specials) - len(pieces))]
    padded = {tok: i for i, tok in enumerate([*pieces, *filler, *specials])}
    assert len(padded) == vocab_size and padded["<|endoftext|>"] == CLIP_EOS, "padding arithmetic"
    (dest / "vocab.json").write_text(json.dumps(padded))
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (dest / stale).unlink(missing_ok=True)
    tokenizer = CLIPTokenizer(str(dest / "vocab.json"), str(dest / "merges.txt"), pad_token="<|endoftext|>")
    tokenizer.model_max_length = SD1_TEXT["max_position_embeddings"]
    tokenizer.save_pretrained(dest)
    return tokenizer


def padded_tokenizer() -> Any:
    """:func:`write_padded_tokenizer`'s tokenizer, its files written to a folder removed afterwards (the
    pipeline's ``save_pretrained`` writes them where they belong)."""
    work = Path(tempfile.mkdtemp(prefix="tok-"))
    try:
        return write_padded_tokenizer(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_built(root: Path, name: str, build: Callable[[Path], Path]) -> Path:
    """``root/models/name``, made by ``build`` first if it is not there (under a temporary name, then
    renamed: an interrupted build leaves no half folder behind). ``build`` writes the marker file last."""
    dest = root / "models" / name
    if (dest / MARKER).is_file():
        return dest
    root.joinpath("models").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=root / "models"))
    try:
        build(work / "model")
        os.replace(work / "model", dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def build_sd1_pipeline(dest: Path) -> Path:
    """Write the random-weight SD 1.x pipeline folder (seeded before each component: reproducible)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = padded_tokenizer()
    # SD 1.x's text config carries the original CLIP training's ids (bos 0, eos 2, pad 1); transformers'
    # CLIPTextModel pools at the highest id when eos_token_id == 2 (its legacy rule), which with CLIP's
    # vocabulary is <|endoftext|> = 49407: the same position our padded ids give, so the literal values stay.
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(SD1_UNET)
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(SD1_VAE)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD1_TEXT))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD1_PNDM),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(dest, safe_serialization=True)
    (dest / MARKER).write_text(json.dumps({"version": VERSION}))
    return dest


def ensure_sd1_model(root: Path) -> Path:
    """The SD 1.x folder under ``root``, built first if needed."""
    return ensure_built(root, f"sd1-true-size-v{VERSION}", build_sd1_pipeline)


def parameter_counts(folder: Path) -> dict[str, int]:
    """Parameters per weighted component, read from the safetensors headers (nothing is loaded)."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for part in ("unet", "vae", "text_encoder"):
        total = 0
        for file in sorted((folder / part).glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    total += _numel(handle, key)
        counts[part] = total
    return counts


def _numel(handle: Any, key: str) -> int:
    n = 1
    for dim in handle.get_slice(key).get_shape():
        n *= dim
    return n


if __name__ == "__main__":
    from benchmarks.common import CACHE_ROOT

    root = Path(sys.argv[1]) if len(sys.argv) > 1 else CACHE_ROOT
    folder = ensure_sd1_model(root)
    print(folder, parameter_counts(folder))
