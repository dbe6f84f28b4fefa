"""LoRA weights on a generation pipeline: find them, check them, put them on at a scale.

The weights are diffusers' standard LoRA file (``pytorch_lora_weights.safetensors``, what a
``train.method=lora`` run exports and what most published LoRAs are), loaded with the pipeline's own
``load_lora_weights``, so anything diffusers can load works here and the other way round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdcluster.config import Config, ConfigError
from sdcluster.config.generate import LORA_WEIGHTS, is_hub_lora
from sdcluster.model_source import is_hub_id

ADAPTER = "lora"  # the adapter's name on the pipeline (set_adapters refers to it)


def lora_file(lora: Path) -> Path:
    """The weights file of ``generate.lora``: the folder's standard LoRA file, or the file itself."""
    return lora / LORA_WEIGHTS if lora.is_dir() else lora


def require_lora(lora: Path) -> None:
    """Fail with the fix when the LoRA weights are missing (a LoRA run that has not finished yet). A hub
    LoRA was checked when launch staged it; the job reads the staged file (:func:`lora_weights`)."""
    if is_hub_lora(str(lora)):
        return
    weights = lora_file(lora)
    if not weights.is_file() or weights.suffix != ".safetensors":
        raise ConfigError(
            f"generate.lora: no LoRA weights at {weights}. Fix: train first (task=train_generate), or set "
            f"generate.lora to a folder holding {LORA_WEIGHTS} or to a .safetensors file"
        )


def lora_weights(cfg: Config, lora: Path) -> Path:
    """Where the LoRA of ``paths.generation_lora`` is read from: a hub ``generate.lora``'s staged file
    (pinned at launch, read from the cache with the hub off), else ``lora`` itself."""
    if is_hub_lora(str(lora)):
        from sdcluster.models.hub_generate import staged_lora_file

        return staged_lora_file(cfg)
    return lora


def base_source(cfg: Config) -> tuple[str, dict[str, Any]]:
    """Where a model named by id loads from, and the revision/variant ``from_pretrained`` needs for it: a
    hub ``generate.model``'s staged snapshot (pinned at launch), else the run's base model."""
    from sdcluster.models.load import resolve_model_path

    if cfg.generate.model and is_hub_id(cfg.generate.model):
        from sdcluster.models.hub_generate import staged_generate_folder

        return str(staged_generate_folder(cfg)), {}

    source = resolve_model_path(cfg.model, cfg.cache_root)
    pinned = {"variant": cfg.model.variant}
    if source == cfg.model.path:  # a hub id as such (not a folder): its revision applies
        pinned["revision"] = cfg.model.revision
    return source, pinned


def apply_lora(pipe: Any, lora: Path, scale: float) -> None:
    """Load the LoRA onto ``pipe`` (UNet, and text encoder when the file adapts it) acting at ``scale``."""
    weights = lora_file(lora)
    pipe.load_lora_weights(
        str(weights.parent), weight_name=weights.name, adapter_name=ADAPTER, use_safetensors=True
    )
    pipe.set_adapters([ADAPTER], adapter_weights=[scale])
