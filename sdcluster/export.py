"""Export the fine-tuned weights as a complete diffusers pipeline that loads without sdcluster."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger("sdcluster")


def export_pipeline(
    dest: Path,
    source: str,
    unet: Any,
    text_encoder: Any,
    vae: Any,
    tokenizer: Any,
    ema: Any,
    prediction_type: str | None = None,
) -> Path:
    """Write ``StableDiffusionPipeline`` folders (safetensors) atomically; EMA weights when EMA is on.

    The scheduler and any other component come from ``source``; the safety checker is left out (a research
    export). Written to a temporary folder and renamed, so ``dest`` is either the previous or the new export.
    """
    from diffusers import StableDiffusionPipeline

    params = list(unet.parameters())
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            unet=unet,
            text_encoder=text_encoder,
            vae=vae,
            tokenizer=tokenizer,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        if prediction_type:  # what the UNet was trained to predict; the source scheduler may say otherwise
            pipe.scheduler.register_to_config(prediction_type=prediction_type)
        tmp = dest.with_name(f".tmp-{dest.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
    finally:
        if ema is not None:
            ema.restore(params)
    old = dest.with_name(f".old-{dest.name}")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    log.info("exported pipeline (%s weights): %s", "EMA" if ema is not None else "trained", dest)
    return dest
