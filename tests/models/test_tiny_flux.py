"""The embedded tiny FLUX (``model=tiny_flux``) is FLUX.1-dev's classes and wiring, built offline and loadable
by plain ``FluxPipeline``; the FLUX.1 configs name their hub repos, whose files the staging selects per
family."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from sdcluster.config import ConfigError
from sdcluster.models.embedded import ensure_tiny_model, is_complete
from sdcluster.models.family import FLUX, family_of_folder
from sdcluster.models.hub_files import select_files
from sdcluster.models.tiny_flux import build_tiny_flux
from tests.conftest import compose


@pytest.fixture(scope="module")
def tiny_flux(cache_root):
    return ensure_tiny_model(cache_root, "tiny_flux")


def test_it_loads_offline_as_flux_with_flux_dev_s_classes_and_settings(tiny_flux, monkeypatch):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from huggingface_hub import constants
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert is_complete(tiny_flux) and isinstance(family_of_folder(tiny_flux), FLUX)
    pipe = FluxPipeline.from_pretrained(str(tiny_flux), use_safetensors=True)
    transformer = pipe.transformer
    assert isinstance(transformer, FluxTransformer2DModel) and transformer.config.guidance_embeds
    assert transformer.config.in_channels == 4 * pipe.vae.config.latent_channels  # 2x2 packed latents
    assert isinstance(pipe.vae, AutoencoderKL)
    vae = pipe.vae.config
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 0.3611, 0.1159)
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    scheduler = pipe.scheduler
    assert isinstance(scheduler, FlowMatchEulerDiscreteScheduler) and scheduler.config.use_dynamic_shifting
    assert (scheduler.config.base_shift, scheduler.config.max_shift) == (0.5, 1.15)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.text_encoder_2, T5EncoderModel) and isinstance(pipe.tokenizer_2, T5TokenizerFast)
    assert pipe.tokenizer_2.model_max_length == FLUX.t5_tokens == 512
    ids = pipe.tokenizer_2("a pair of denim jeans").input_ids
    assert ids[-1] == pipe.tokenizer_2.eos_token_id and pipe.tokenizer_2.unk_token_id not in ids
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a pair of jeans", num_inference_steps=2, height=64, width=64, output_type="np")
    assert out.images.shape == (1, 64, 64, 3) and np.isfinite(out.images).all()


def _digest(folder) -> str:
    files = sorted(p for p in folder.rglob("*.safetensors"))
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def test_the_build_is_seeded(tiny_flux, tmp_path):
    """Built again, every weight file is the same: a test's numbers do not depend on the machine."""
    assert _digest(build_tiny_flux(tmp_path / "again")) == _digest(tiny_flux)


@pytest.mark.parametrize(("name", "repo"), [("flux_dev", "FLUX.1-dev"), ("flux_schnell", "FLUX.1-schnell")])
def test_the_flux_configs_name_their_hub_repos(name, repo):
    model = compose([f"model={name}"]).model
    assert model.path == f"black-forest-labs/{repo}"
    assert model.native_resolution == 1024


FLUX_INDEX = {
    "_class_name": "FluxPipeline",
    **{p: ["transformers", "X"] for p in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")},
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "image_encoder": [None, None],
    "feature_extractor": [None, None],
}
FLUX_REPO = [  # the layout of the FLUX.1 repos, with their single-file copies for other tools
    "model_index.json",
    "flux1-dev.safetensors",
    "ae.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.json",
    "tokenizer/merges.txt",
    "tokenizer/vocab.json",
    "tokenizer_2/spiece.model",
    "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "scheduler/scheduler_config.json",
]


def test_staging_selects_fluxs_pipeline_files_and_every_shard():
    chosen = select_files(FLUX_INDEX, FLUX_REPO, None, "r")
    assert "transformer/diffusion_pytorch_model-00003-of-00003.safetensors" in chosen
    assert "transformer/diffusion_pytorch_model.safetensors.index.json" in chosen
    assert "text_encoder_2/model-00002-of-00002.safetensors" in chosen
    assert "tokenizer_2/spiece.model" in chosen and "scheduler/scheduler_config.json" in chosen
    assert "flux1-dev.safetensors" not in chosen and "ae.safetensors" not in chosen
    pickled = [f for f in FLUX_REPO if not f.startswith("transformer/diffusion")] + [
        "transformer/diffusion_pytorch_model.bin"
    ]
    with pytest.raises(ConfigError, match="no safetensors weights for transformer"):
        select_files(FLUX_INDEX, pickled, None, "r")
