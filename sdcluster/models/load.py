"""Find and load the Stable Diffusion components, whatever the source (embedded tiny model, folder, hub id).

Training and generation get the same objects for the tiny model and for SD 1.4: nothing downstream knows.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdcluster.config import ConfigError, ModelConfig
from sdcluster.model_source import is_embedded, is_hub_id, is_local, looks_like_hub_id
from sdcluster.models.family import Family, family_of, family_of_folder

if TYPE_CHECKING:  # accelerate and torch are imported by the training job, not by the login node's checks
    import torch
    from accelerate import Accelerator

    from sdcluster.models.text_encoders import TextEncoders

log = logging.getLogger("sdcluster")


def check_safetensors(folder: Path, key: str) -> None:
    """Every weighted component of a pipeline folder (as its family names them) has safetensors weights:
    pickles are never loaded."""
    try:
        family = family_of_folder(folder)
    except ValueError as err:  # another pipeline (or an unreadable index): refused here, before any job
        raise ConfigError(
            f"{key}: {err}. Fix: point {key} at a Stable Diffusion 1.x/2.x, SDXL, SD 3.x or FLUX.1 pipeline "
            "folder"
        ) from None
    for part in family.weighted_parts():
        if not any((folder / part).glob("*.safetensors")):
            raise ConfigError(
                f"{key}: {folder / part} has no .safetensors weights (pickled .bin weights are never "
                "loaded: loading them can run code). Fix: save the pipeline again with "
                "save_pretrained(..., safe_serialization=True)"
            )


def check_model_source(model: ModelConfig) -> None:
    """Login-node check: a local folder must be a diffusers pipeline; anything else must be a hub id."""
    check_vae_path(model)
    if is_embedded(model.path):
        return
    if is_local(model.path):
        folder = Path(model.path).expanduser()
        if not (folder / "model_index.json").is_file():
            raise ConfigError(
                f"model.path: {folder} is not a diffusers pipeline folder (no model_index.json). "
                "Fix: point model.path at a folder saved by save_pretrained, or use a hub id such as "
                "CompVis/stable-diffusion-v1-4"
            )
        check_safetensors(folder, "model.path")
        return
    if not looks_like_hub_id(model.path):
        raise ConfigError(
            f"model.path: {model.path!r} is neither an existing folder nor a hub id (owner/name). "
            "Fix: check the path, or use model=sd14 / model=tiny"
        )


def check_vae_path(model: ModelConfig) -> None:
    """``model.vae_path`` is a hub id (staged at launch) or a local ``AutoencoderKL`` folder with
    safetensors weights."""
    if model.vae_path is None or is_hub_id(model.vae_path):
        return
    folder = Path(model.vae_path).expanduser()
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise ConfigError(
            f"model.vae_path: {model.vae_path} is not a folder holding a VAE's config.json and .safetensors "
            "weights. Fix: give the VAE's folder (saved with save_pretrained), or a hub id such as "
            "madebyollin/sdxl-vae-fp16-fix, or drop model.vae_path"
        )


def load_vae_override(model: ModelConfig, dtype: Any = None) -> Any:
    """The VAE of ``model.vae_path`` (safetensors only), or None when the model's own is used.

    A hub id pinned by launch (``model.vae_commit``) is read from its staged copy, like the model.
    """
    if not model.vae_path:
        return None
    from diffusers import AutoencoderKL

    check_vae_path(model)
    source = model.vae_path
    if is_hub_id(source) and model.vae_commit:
        from sdcluster.models.hub import staged_vae_folder

        source = str(staged_vae_folder(model))
    vae = AutoencoderKL.from_pretrained(source, use_safetensors=True)
    return vae if dtype is None else vae.to(dtype)


def resolve_model_path(model: ModelConfig, cache_root: str | Path) -> str:
    """The folder or hub id to load; ``tiny`` and ``tiny_sdxl`` are built (once, cached) on first use.

    A hub model pinned by launch (``model.commit``) is its staged snapshot folder, read from the cache
    alone: jobs run with the hub switched off. Unpinned (a library caller that skipped launch), the hub id.
    """
    if is_embedded(model.path):
        from sdcluster.models.embedded import ensure_tiny_model

        return str(ensure_tiny_model(cache_root, model.path))
    if is_local(model.path):
        return str(Path(model.path).expanduser())
    if model.commit:
        from sdcluster.models.hub import staged_folder

        return str(staged_folder(model))
    return model.path


def _hub_snapshot(source: str, revision: str | None, parts: tuple[str, ...]) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        patterns = [f"{sub}/*" for sub in parts]
        folder = snapshot_download(source, revision=revision, local_files_only=True, allow_patterns=patterns)
        return Path(folder)
    except Exception:  # not in the local hub cache: the id and revision are all we know
        return None


def encoder_parts(family: Family) -> tuple[str, ...]:
    """The folders whose files the latent cache's numbers come from: the VAE, the family's tokenizers and
    text encoders (SDXL's ``_2`` ones too)."""
    return ("vae", *family.tokenizer_classes, *family.text_encoder_classes)


def _file_stats(folder: Path, subs: tuple[str, ...]) -> dict[str, list[int]]:
    files: dict[str, list[int]] = {}
    for sub in subs:
        for path in sorted((folder / sub).rglob("*")):
            if path.is_file():
                stat = path.stat()
                files[path.relative_to(folder).as_posix()] = [stat.st_size, stat.st_mtime_ns]
    return files


def model_files(source: str, parts: tuple[str, ...], revision: str | None) -> dict[str, list[int]]:
    """(size, mtime) of every file under ``parts`` (:func:`encoder_parts`) of a model folder or of a hub
    model's cached snapshot, keyed by path (so not by the order of ``parts``): the files the latent cache's
    numbers come from (its key: :func:`sdcluster.identity.latent_cache_key`). A hub model not in the local
    cache has none: its id and revision are all that is known."""
    if is_local(source):
        folder: Path | None = Path(source)
    else:
        folder = _hub_snapshot(source, revision, parts) if is_hub_id(source) else None
    return _file_stats(folder, parts) if folder else {}


def vae_files(vae_path: str) -> dict[str, list[int]]:
    """(size, mtime) of every file of ``model.vae_path``'s folder, keyed ``<folder name>/<file>``."""
    folder = Path(vae_path)
    return _file_stats(folder.parent, (folder.name,))


@dataclass
class Components:
    """What training needs from a pipeline: the trainable denoiser and the frozen rest.

    ``family`` (:mod:`sdcluster.models.family`) says which of them a model has and how they are used; the
    tokenizers and text encoders are held by their pipeline component names (``tokenizer``,
    ``text_encoder``, SDXL's ``tokenizer_2`` and ``text_encoder_2``), as many as the family has.
    """

    family: Family
    tokenizers: dict[str, Any]
    text_encoders: TextEncoders  # each loaded on first use (a cached run uses none)
    vae: Any
    denoiser: torch.nn.Module  # the family's denoiser_name component: a UNet (or a transformer); None
    # only where load_components was asked to leave it out
    noise_scheduler: Any
    source: str
    origin: dict[str, Any] | None = None  # hub id, revision and commit of a hub model (see models.hub)


def _load_class(module: str, name: str) -> Any:
    """A class the family names by string (so that the family module imports neither library)."""
    import importlib

    return getattr(importlib.import_module(module), name)


def load_components(
    model: ModelConfig,
    cache_root: str | Path,
    accelerator: Accelerator | None = None,
    denoiser: bool = True,
) -> Components:
    """Load each component the family names the way diffusers' own training examples do (one
    ``from_pretrained`` each). ``denoiser=False`` leaves out the one part a latent-cache build never runs
    (``Components.denoiser`` is then None): FLUX's is 12B parameters.

    With several processes the embedded tiny model is built by global rank 0 while the others wait:
    transformers (5.x) writes weights only on rank 0 once torch.distributed is up, so a copy built on
    another rank would have empty weight folders.
    """
    from sdcluster.models.hub import origin
    from sdcluster.models.text_encoders import TextEncoders

    if is_embedded(model.path) and accelerator is not None and accelerator.num_processes > 1:
        if accelerator.is_main_process:
            resolve_model_path(model, cache_root)
        accelerator.wait_for_everyone()
    source = resolve_model_path(model, cache_root)
    staged = is_hub_id(model.path) and source != model.path
    # a staged snapshot is a plain folder already pinned to its commit: a revision would mean nothing there
    common: dict[str, Any] = {"revision": None if staged else model.revision}
    if staged:
        offline = os.environ.get("HF_HUB_OFFLINE", "0")
        log.info(
            "model %s at commit %s, read from %s (HF_HUB_OFFLINE=%s)",
            model.path,
            model.commit,
            source,
            offline,
        )
    # safetensors only: a pickled .bin can run code when loaded; nothing here enables remote code either
    weights = {**common, "variant": model.variant, "use_safetensors": True}
    family = family_of(source, common["revision"])

    def load(module: str, cls: str, sub: str, **kw: Any) -> Any:
        return _load_class(module, cls).from_pretrained(source, subfolder=sub, **kw)

    tokenizers = {n: load("transformers", c, n, **common) for n, c in family.tokenizer_classes.items()}
    encoders = TextEncoders(
        {
            n: functools.partial(load, "transformers", c, n, **weights)
            for n, c in family.text_encoder_classes.items()
        },
        {n: _encoder_dtype(source, c, n, common) for n, c in family.text_encoder_classes.items()},
    )
    return Components(
        family=family,
        tokenizers=tokenizers,
        text_encoders=encoders,
        vae=load_vae(model, source, weights),
        denoiser=load("diffusers", family.denoiser_class, family.denoiser_name, **weights)
        if denoiser
        else None,
        noise_scheduler=load("diffusers", family.noise_scheduler_class, "scheduler", **common),
        source=source,
        origin=origin(model) if is_hub_id(model.path) else None,
    )


def _encoder_dtype(source: str, cls: str, sub: str, common: dict[str, Any]) -> torch.dtype | None:
    """The dtype ``from_pretrained`` gives encoder ``sub`` (its config's; transformers 5 loads with
    ``dtype="auto"``), read from its config alone; None when the config names none."""
    from sdcluster.models.text_encoders import config_dtype

    config_class = _load_class("transformers", cls).config_class
    return config_dtype(config_class.from_pretrained(source, subfolder=sub, **common))


def half_dtype(mixed_precision: str) -> torch.dtype | None:
    """The half type ``mixed_precision`` (``no``/``fp16``/``bf16``) computes in, or None in float32.

    The one mapping that training (:func:`~sdcluster.train.method.weight_dtype`) and a ``task=cache`` build
    both cast by: the latent cache's key holds the frozen parts' dtypes, so the two must agree."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)


def prepare_frozen(model: ModelConfig, comps: Components, device: Any, half: torch.dtype | None) -> None:
    """The frozen parts (VAE, text encoders) as training runs them: eval, no gradients, on ``device``, in
    the ``half`` type mixed precision computes in (the family may keep its VAE in float32). The latent-cache
    build runs them exactly so too: the cache key holds their dtypes."""
    _freeze(comps.vae, device, comps.family.vae_dtype(model, half))
    # each text encoder as it loads (a cached run loads none: models.text_encoders)
    comps.text_encoders.prepare(functools.partial(_freeze, device=device, cast=half), half)


def _freeze(frozen: torch.nn.Module, device: Any, cast: torch.dtype | None) -> None:
    frozen.requires_grad_(False)
    frozen.eval()
    # Only cast when mixed precision asks for it: a no-op cast still trips diffusers' fp32-module warning.
    frozen.to(device, dtype=cast) if cast else frozen.to(device)


def load_vae(model: ModelConfig, source: str, weights: dict[str, Any]) -> Any:
    """The model's VAE, or the one ``model.vae_path`` names."""
    from diffusers import AutoencoderKL

    own = load_vae_override(model)
    return own if own is not None else AutoencoderKL.from_pretrained(source, subfolder="vae", **weights)
