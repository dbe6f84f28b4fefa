"""SDXL base 1.0 at its true size, built offline: the published component configs, random weights.

As :mod:`benchmarks.true_size_model` does for SD 1.x: the shapes decide what the GPU table measures (memory,
step time), not the weight values, so a seeded random-weight copy with the configs of
:mod:`benchmarks.published_configs` (UNet 2567.5M, VAE 83.7M, CLIP ViT-L 123.1M, OpenCLIP ViT-bigG 694.7M
parameters) measures what the real one would, with no model hub. Both tokenizers are the padded CLIP BPE
tokenizer of SD 1.x's true-size model (49,408 entries; SDXL's second tokenizer pads with ``!`` rather than
``<|endoftext|>``, which changes no shape). About 14 GiB of float32 weights: built on the GPU when there is
one (seconds, where the CPU takes minutes), written as safetensors, loaded like a download with
``model=sdxl model.path=<folder>``.

    python -m benchmarks.true_size_sdxl [DEST]     # build (or find) it and print where it is
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks import common
from benchmarks.true_size_model import MARKER

VERSION = "1"


def build_sdxl_pipeline(dest: Path) -> Path:
    """Write the random-weight SDXL pipeline folder (seeded before each component: reproducible)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from benchmarks.published_configs import CLIP_L_TEXT, SDXL_EULER, SDXL_TEXT_2, SDXL_UNET, SDXL_VAE
    from benchmarks.true_size_model import padded_tokenizer

    tokenizer = padded_tokenizer()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with device:  # initialised where they are made: 3.5 billion random numbers
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config(SDXL_UNET)
        torch.manual_seed(0)
        vae = AutoencoderKL.from_config(SDXL_VAE)
        torch.manual_seed(0)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))
        torch.manual_seed(1)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_EULER),
    )
    pipe.save_pretrained(dest, safe_serialization=True)
    (dest / MARKER).write_text(json.dumps({"version": VERSION}))
    return dest


def ensure_sdxl_model(root: Path = common.CACHE_ROOT) -> Path:
    """The SDXL folder under ``root``, built first if needed."""
    from benchmarks.true_size_model import ensure_built

    return ensure_built(root, f"sdxl-true-size-v{VERSION}", build_sdxl_pipeline)


if __name__ == "__main__":
    print(ensure_sdxl_model(Path(sys.argv[1]) if len(sys.argv) > 1 else common.CACHE_ROOT))
