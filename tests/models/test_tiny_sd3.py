"""The embedded tiny SD3 (``model=tiny_sd3``) is Stable Diffusion 3.5's classes and wiring, built offline and
loadable by plain ``StableDiffusion3Pipeline``; the SD 3.5 configs name their hub repos, whose files the
staging selects per family."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from sdcluster.config import ConfigError
from sdcluster.models.embedded import ensure_tiny_model, is_complete
from sdcluster.models.family import SD3, family_of_folder
from sdcluster.models.hub_files import select_files
from sdcluster.models.tiny_sd3 import build_tiny_sd3
from sdcluster.models.tiny_t5 import T5_MAX_LENGTH
from tests.conftest import compose


@pytest.fixture(scope="module")
def tiny_sd3(cache_root):
    return ensure_tiny_model(cache_root, "tiny_sd3")


def test_it_loads_offline_as_sd3_with_sd3s_classes_and_settings(tiny_sd3, monkeypatch):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from huggingface_hub import constants
    from transformers import CLIPTextModelWithProjection, T5EncoderModel, T5TokenizerFast

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert is_complete(tiny_sd3) and isinstance(family_of_folder(tiny_sd3), SD3)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3), use_safetensors=True)
    assert isinstance(pipe.transformer, SD3Transformer2DModel) and pipe.transformer.config.patch_size == 2
    assert isinstance(pipe.vae, AutoencoderKL)
    vae = pipe.vae.config
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 1.5305, 0.0609)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    assert isinstance(pipe.text_encoder, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert isinstance(pipe.text_encoder_3, T5EncoderModel) and isinstance(pipe.tokenizer_3, T5TokenizerFast)
    ids = pipe.tokenizer_3("a pair of denim jeans").input_ids
    assert ids[-1] == pipe.tokenizer_3.eos_token_id and pipe.tokenizer_3.unk_token_id not in ids
    assert pipe.tokenizer_3.model_max_length == T5_MAX_LENGTH
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a pair of jeans", num_inference_steps=2, height=64, width=64, output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def _digest(folder) -> str:
    files = sorted(p for p in folder.rglob("*.safetensors"))
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def test_the_build_is_seeded(tiny_sd3, tmp_path):
    """Built again, every weight file is the same: a test's numbers do not depend on the machine."""
    assert _digest(build_tiny_sd3(tmp_path / "again")) == _digest(tiny_sd3)


@pytest.mark.parametrize("name", ["sd35_medium", "sd35_large"])
def test_the_sd35_configs_name_their_hub_repos(name):
    model = compose([f"model={name}"]).model
    assert model.path == f"stabilityai/stable-diffusion-3.5-{name.removeprefix('sd35_')}"
    assert model.native_resolution == 1024


SD35_INDEX = {
    "_class_name": "StableDiffusion3Pipeline",
    **{p: ["transformers", "X"] for p in ("text_encoder", "text_encoder_2", "text_encoder_3")},
    **{p: ["transformers", "T"] for p in ("tokenizer", "tokenizer_2", "tokenizer_3")},
    "transformer": ["diffusers", "SD3Transformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "image_encoder": [None, None],
}
SD35_REPO = [  # the layout of the SD 3.5 repos, with their copies for other tools
    "model_index.json",
    "sd3.5_medium.safetensors",
    "text_encoders/t5xxl_fp16.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "text_encoder_3/config.json",
    "text_encoder_3/model-00001-of-00002.safetensors",
    "text_encoder_3/model-00002-of-00002.safetensors",
    "text_encoder_3/model.safetensors.index.json",
    "tokenizer/merges.txt",
    "tokenizer/vocab.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/vocab.json",
    "tokenizer_3/spiece.model",
    "tokenizer_3/tokenizer.json",
    "tokenizer_3/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
]


def test_staging_selects_sd35s_pipeline_files_and_every_t5_shard():
    chosen = select_files(SD35_INDEX, SD35_REPO, None, "r")
    assert "text_encoder_3/model-00002-of-00002.safetensors" in chosen
    assert "text_encoder_3/model.safetensors.index.json" in chosen
    assert "tokenizer_3/spiece.model" in chosen and "transformer/config.json" in chosen
    assert "sd3.5_medium.safetensors" not in chosen, "the single-file copy is not what the pipeline loads"
    assert not any(f.startswith("text_encoders/") for f in chosen)
    pickled_t5 = [f for f in SD35_REPO if not f.startswith("text_encoder_3/model")] + [
        "text_encoder_3/pytorch_model.bin"
    ]
    with pytest.raises(ConfigError, match="no safetensors weights for text_encoder_3"):
        select_files(SD35_INDEX, pickled_t5, None, "r")


def test_the_t5_tokenizer_pads_and_ends_like_t5s(tiny_sd3):
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(tiny_sd3, subfolder="tokenizer_3")
    ids = tokenizer(
        ["jeans", "unknownword"], padding="max_length", truncation=True, max_length=8, return_tensors="pt"
    ).input_ids
    assert ids.shape == (2, 8)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert ids[0, 1].item() == tokenizer.eos_token_id and ids[0, 2:].eq(0).all()
    assert torch.is_tensor(ids)
