"""A LoRA trained with ``train.lora.alpha`` != ``train.lora.rank`` acts at its trained scale (alpha / rank)
wherever its export is loaded: plain diffusers' ``load_lora_weights`` on the base pipeline, sdcluster's own
generation and the fused export. The expectation is the trained adapters put on the base model by hand with
peft, at the configured alpha: the export is not what is checked against itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdcluster import paths
from sdcluster.config import Config
from sdcluster.train import step_folders
from sdcluster.train.loop import train

pytestmark = pytest.mark.slow

RUN = [
    "train.log_every=1",
    "train.checkpoint_every=100",
    "train.validation_prompts=[]",
    "train.method=lora",
    "train.lora.rank=4",
    "train.max_steps=2",
    "optim.lr=5e-2",  # high, so that two steps move the adapters visibly
    "train.lora.text_encoder_lr=5e-2",
    "train.lora.fuse_export=true",
    "generate.height=64",
    "generate.width=64",
]
ENCODERS = {"sd1": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"]}
CASES = [("sd1", 1.0), ("sd1", 16.0), ("sdxl", 1.0)]


def _plain(source: str | Path, family: str):
    """The pipeline at ``source`` as a diffusers user loads it, sampling with DDIM as sdcluster's
    generation does by default (the model's own scheduler config carried over)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    if family == "sdxl":
        pipe = StableDiffusionXLPipeline.from_pretrained(str(source), use_safetensors=True)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(str(source), safety_checker=None, use_safetensors=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _trained_by_hand(cfg: Config, source: str, family: str, checkpoint: Path):
    """The base pipeline with the checkpoint's adapter tensors in peft layers made with the run's rank and
    alpha: the model the run trained, rebuilt without the export."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = cfg.train.lora
    pipe = _plain(source, family)

    def adapt(module: torch.nn.Module, targets: list[str], file: Path) -> None:
        config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=targets)
        inject_adapter_in_model(config, module)
        missing, unexpected = module.load_state_dict(load_file(str(file)), strict=False)
        assert not unexpected and not [m for m in missing if "lora_" in m]

    adapt(pipe.unet, list(lora.target_modules), checkpoint / "model.safetensors")
    for index, name in enumerate(ENCODERS[family], start=1):
        targets = ["q_proj", "k_proj", "v_proj", "out_proj"]
        adapt(getattr(pipe, name), targets, checkpoint / f"model_{index}.safetensors")
    return pipe


def _pixels(pipe) -> np.ndarray:
    """Float pixels of one image (no 8-bit rounding, so a small difference in scale shows)."""
    out = pipe(
        "a pair of jeans",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="np",
    )
    return np.asarray(out.images[0], dtype=np.float64)


@pytest.mark.parametrize(("family", "alpha"), CASES)
def test_exported_lora_acts_at_the_trained_alpha(make_cfg, family, alpha):
    from sdcluster.generate.render import load_pipeline
    from sdcluster.models.load import resolve_model_path

    model = {"sd1": "model=tiny", "sdxl": "model=tiny_sdxl"}[family]
    cfg = make_cfg([*RUN, model, f"train.lora.alpha={alpha}"])
    assert cfg.train.lora.alpha != cfg.train.lora.rank and cfg.generate.scheduler == "ddim"
    result = train(cfg)
    source = resolve_model_path(cfg.model, cfg.cache_root)
    checkpoint = step_folders.complete_checkpoints(result.run_dir / "checkpoints")[0]

    trained = _pixels(_trained_by_hand(cfg, source, family, checkpoint))
    base = _pixels(_plain(source, family))
    assert np.abs(trained - base).max() > 1e-2  # the adapters are not zero: alpha has something to scale

    loaded = _plain(source, family)
    loaded.load_lora_weights(str(result.model_dir))
    np.testing.assert_allclose(_pixels(loaded), trained, rtol=0, atol=1e-4)

    # sdcluster's generation after the run (the base model with the run's own export, at scale 1)
    assert paths.generation_lora(cfg) == result.model_dir and cfg.generate.lora_scale == 1.0
    np.testing.assert_allclose(_pixels(load_pipeline(cfg)), trained, rtol=0, atol=1e-4)

    # the fused export: the same weights folded in (fusing rounds differently, hence a looser bound)
    fused = _pixels(_plain(paths.run_paths(cfg).model, family))
    np.testing.assert_allclose(fused, trained, rtol=0, atol=1e-3)
