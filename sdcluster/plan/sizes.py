"""How many parameters each component of a model has, counted without loading a weight.

Every component is built from its own ``config.json`` (read from the embedded, local or staged model folder)
with the real diffusers/transformers class on torch's ``meta`` device: parameters get shapes and no memory,
so SDXL's 2.6B-parameter UNet is counted on a login node in a second. LoRA adapters are injected by peft as
training injects them (:class:`sdcluster.train.method.LoRA`), so their count is peft's, not a formula's.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sdcluster.config import Config
from sdcluster.models.family import Family, family_of_folder


@dataclass(frozen=True)
class ModelSizes:
    """Parameter counts of one model (and of its adapters under ``cfg.train.lora``), read once per plan."""

    family: str
    denoiser: int
    """Parameters of the denoiser (the UNet)."""
    frozen: dict[str, int]
    """Parameters of every frozen component by its pipeline name (the VAE, each text encoder)."""
    vae_stays_fp32: bool
    """Whether the family keeps the VAE in float32 under mixed precision (SDXL's own VAE)."""
    largest_block: int
    """Parameters of the denoiser's largest block: what a sharded strategy gathers at once."""
    denoiser_width: int | None
    """The denoiser's width its activations scale with (``Family.denoiser_width``: a UNet's first block's
    channels, a transformer's hidden size)."""
    denoiser_shapes: tuple[tuple[int, ...], ...] = ()
    """The shape of each denoiser parameter: what a full fine-tune's optimizer keeps state for."""
    adapter_shapes: tuple[tuple[int, ...], ...] = ()
    """The shape of each trained adapter tensor (denoiser's and, when trained, the text encoders')."""
    denoiser_adapters: int = 0
    """LoRA parameters in the denoiser (0 for a full fine-tune)."""
    encoder_adapters: int = 0
    """LoRA parameters in the text encoders (only when they are trained: ``train.lora.text_encoder_lr``)."""
    token_sequence: tuple[int, int] | None = None
    """A transformer's (pixels per token side, text tokens) (``Family.token_sequence``); None: a UNet."""


def model_folder(cfg: Config) -> Path | None:
    """The pipeline folder whose configs describe ``cfg.model`` (the embedded model is built, once), or None
    when they are not on this machine (a hub model a dry run did not stage)."""
    from sdcluster.models.load import resolve_model_path

    folder = Path(resolve_model_path(cfg.model, cfg.cache_root))
    return folder if (folder / "model_index.json").is_file() else None


def _component_class(folder: Path, name: str) -> Any:
    """The class ``model_index.json`` names for a component (``["diffusers", "UNet2DConditionModel"]``)."""
    library, cls = json.loads((folder / "model_index.json").read_text())[name]
    return getattr(importlib.import_module(library), cls)


def _on_meta(folder: Path, name: str) -> Any:
    """The component built from its config on the meta device: shapes, no memory, no weights read."""
    import torch

    cls = _component_class(folder, name)
    with torch.device("meta"):
        if hasattr(cls, "load_config"):  # a diffusers model
            return cls.from_config(cls.load_config(folder, subfolder=name))
        config = cls.config_class.from_pretrained(folder, subfolder=name)  # a transformers model
        return cls(config)


def _count(module: Any, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _largest_block(denoiser: Any) -> int:
    """The largest of the denoiser's blocks (each item of a top-level module list, or a top-level module)."""
    import torch

    blocks = []
    for child in denoiser.children():
        blocks += list(child) if isinstance(child, torch.nn.ModuleList) else [child]
    return max((_count(b) for b in blocks), default=_count(denoiser))


def _shapes(module: Any, trainable_only: bool = False) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(p.shape) for p in module.parameters() if p.requires_grad or not trainable_only)


def _adapters(module: Any, rank: int, targets: list[str] | tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """The shapes of the tensors peft adds to ``module`` for adapters of ``rank`` on ``targets``."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    with torch.device("meta"):
        module.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=rank, target_modules=list(targets)), module)
    return _shapes(module, trainable_only=True)


def _vae_folder(cfg: Config, folder: Path) -> tuple[Path, str]:
    """Where the VAE's config is: ``model.vae_path`` (a local or staged folder) or the model's ``vae``."""
    if not cfg.model.vae_path:
        return folder, "vae"
    from sdcluster.model_source import is_hub_id

    if is_hub_id(cfg.model.vae_path) and cfg.model.vae_commit:
        from sdcluster.models.hub import staged_vae_folder

        own = Path(staged_vae_folder(cfg.model))
    else:
        own = Path(cfg.model.vae_path).expanduser()
    return own.parent, own.name


def _vae_params(cfg: Config, folder: Path) -> int:
    import torch
    from diffusers import AutoencoderKL

    root, sub = _vae_folder(cfg, folder)
    with torch.device("meta"):
        return _count(AutoencoderKL.from_config(AutoencoderKL.load_config(root, subfolder=sub)))


def _vae_stays_fp32(family: Family, cfg: Config) -> bool:
    import torch

    return family.vae_dtype(cfg.model, torch.float16) == torch.float32


def model_sizes(cfg: Config, folder: Path) -> ModelSizes:
    """Count every component of the model in ``folder`` and, when ``cfg.train`` trains adapters, them."""
    family = family_of_folder(folder)
    denoiser = _on_meta(folder, family.denoiser_name)
    frozen = {"vae": _vae_params(cfg, folder)}
    encoders = {name: _on_meta(folder, name) for name in family.text_encoder_classes}
    frozen.update({name: _count(encoder) for name, encoder in encoders.items()})
    sizes = ModelSizes(
        family=family.name,
        denoiser=_count(denoiser),
        frozen=frozen,
        vae_stays_fp32=_vae_stays_fp32(family, cfg),
        largest_block=_largest_block(denoiser),
        denoiser_width=family.denoiser_width(denoiser.config),
        denoiser_shapes=_shapes(denoiser),
        token_sequence=family.token_sequence(),
    )
    return with_adapters(sizes, cfg, folder) if cfg.train.trains_adapters else sizes


def with_adapters(sizes: ModelSizes, cfg: Config, folder: Path) -> ModelSizes:
    """``sizes`` with the adapters ``cfg.train.lora`` would add (the text encoders' only when trained)."""
    family = family_of_folder(folder)
    lora = cfg.train.lora
    denoiser = _adapters(_on_meta(folder, family.denoiser_name), lora.rank, lora.target_modules)
    encoders: tuple[tuple[int, ...], ...] = ()
    if lora.text_encoder_lr is not None:
        for name in family.text_encoder_classes:
            encoders += _adapters(_on_meta(folder, name), lora.rank, family.text_encoder_targets)
    return replace(
        sizes,
        adapter_shapes=denoiser + encoders,
        denoiser_adapters=sum(math.prod(s) for s in denoiser),
        encoder_adapters=sum(math.prod(s) for s in encoders),
    )
