"""Export the fine-tuned weights as a complete diffusers pipeline that loads without sdcluster."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sdcluster import atomic
from sdcluster.train.ema import ema_weights

log = logging.getLogger("sdcluster")


def export_pipeline(
    dest: Path,
    source: str,
    unet: Any,
    ema: Any,
    prediction_type: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
) -> Path:
    """Write ``StableDiffusionPipeline`` folders (safetensors) atomically; EMA weights when EMA is on.

    Only the UNet is trained; every other component (VAE, text encoder, tokenizer, scheduler) is read again
    from ``source`` as it was published, not taken from the training process, where mixed precision cast
    the frozen models to fp16/bf16. The safety checker is left out (a research export). Written to a
    temporary folder and published in one rename, so ``dest`` is either the previous
    or the new export.
    """
    from diffusers import StableDiffusionPipeline

    tmp = atomic.staging_dir(dest)
    with ema_weights(ema, unet), atomic.explain_disk_full(dest, tmp, ": it exports from the last checkpoint"):
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            unet=unet,
            revision=revision,
            variant=variant,
            use_safetensors=True,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        if prediction_type:  # what the UNet was trained to predict; the source scheduler may say otherwise
            pipe.scheduler.register_to_config(prediction_type=prediction_type)
        pipe.save_pretrained(tmp, safe_serialization=True)
    atomic.publish_dir(tmp, dest)
    log.info("exported pipeline (%s weights): %s", "EMA" if ema is not None else "trained", dest)
    return dest
