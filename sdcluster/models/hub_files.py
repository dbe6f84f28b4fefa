"""Which files of a hub repo a job loads, per kind of repo: a diffusers pipeline, one diffusers model (a
VAE), a LoRA, a transformers CLIP model. Safetensors weights only, everywhere: a pickled ``.bin`` can run
code when it is loaded. Pure functions of the repo's file listing (and a pipeline's ``model_index.json``),
so the staging (:mod:`sdcluster.models.hub`) and the tests share them without a hub.
"""

from __future__ import annotations

import re
from typing import Any

from sdcluster.config import ConfigError
from sdcluster.config.generate import LORA_WEIGHTS
from sdcluster.models.family import family_of_index

# Components of model_index.json that sdcluster never loads (the export passes None for them): the
# safety checker alone is 1.2 GB in SD 1.x repos.
NOT_LOADED = frozenset({"safety_checker", "feature_extractor", "image_encoder"})
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".ckpt",
    ".pt",
    ".pth",
    ".msgpack",
    ".h5",
    ".onnx",
    ".pb",
    ".onnx_data",
)
INDEX_FILE = "model_index.json"
CONFIG_FILE = "config.json"  # of a repo holding one model (a VAE for model.vae_path)


def select_files(index: dict[str, Any], repo_files: list[str], variant: str | None, where: str) -> list[str]:
    """The files a pipeline load reads: model_index.json, then per loaded component its configs, tokenizer
    and scheduler files, and the safetensors weights of ``variant`` (never pickles, checkpoints, EMA or
    full-precision twins). ``where`` names the repo in errors."""
    suffix = re.escape(f".{variant}") if variant else ""
    weights = re.compile(rf"^[^.]+{suffix}(-\d{{5}}-of-\d{{5}})?\.safetensors$")
    weight_index = re.compile(rf"^[^.]+\.safetensors\.index{suffix}\.json$")
    parts = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]]
    try:  # every part that must have safetensors weights: the family's denoiser, VAE and text encoders
        weighted = family_of_index(index, where).weighted_parts()
    except ValueError as err:
        raise ConfigError(f"model.path: {err}. Fix: pick a repo of one of those pipelines") from None
    chosen = [INDEX_FILE]
    for part in (p for p in parts if p not in NOT_LOADED):
        names = [f.split("/", 1)[1] for f in repo_files if f.startswith(f"{part}/") and f.count("/") == 1]
        found = [n for n in names if weights.match(n) or weight_index.match(n)]
        if part in weighted and not any(n.endswith(".safetensors") for n in found):
            what = f"{variant} safetensors weights" if variant else "safetensors weights"
            fix = (
                "drop model.variant (or pick a variant the repo has)"
                if variant
                else "pick a repo that has them"
            )
            raise ConfigError(
                f"model.path: {where} has no {what} for {part} (pickled .bin weights are never loaded: "
                f"loading them can run code). Fix: {fix}"
            )
        others = [n for n in names if not n.endswith(WEIGHT_SUFFIXES) and ".index" not in n]
        chosen += [f"{part}/{n}" for n in sorted(others + found)]
    return chosen


def select_component_files(repo_files: list[str], where: str) -> list[str]:
    """The files ``from_pretrained`` of a one-model repo (a VAE) reads: its ``config.json`` and the
    safetensors weights at the top of the repo (no variants, no pickles)."""
    # diffusers' and transformers' weight names only: VAE repos also carry single-file copies for other
    # tools (sdxl_vae.safetensors) that from_pretrained never reads
    name = r"(diffusion_pytorch_model|model)"
    weights = re.compile(rf"^{name}(-\d{{5}}-of-\d{{5}})?\.safetensors$|^{name}\.safetensors\.index\.json$")
    found = sorted(f for f in repo_files if weights.match(f))
    if not any(f.endswith(".safetensors") for f in found):
        raise ConfigError(
            f"model.path: {where} has no safetensors weights at its top level (pickled .bin weights are "
            "never loaded: loading them can run code). Fix: pick a repo that has them"
        )
    return [CONFIG_FILE, *found]


# transformers' own weight names: a CLIP repo also carries pickles, TF and Flax copies that are never read
_TRANSFORMERS_WEIGHTS = re.compile(
    r"^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$"
)
_TRANSFORMERS_OTHERS = (".json", ".txt", ".model")  # configs, tokenizer vocabularies, sentencepiece models


def select_clip_files(repo_files: list[str], where: str) -> list[str]:
    """What ``CLIPModel`` and ``CLIPProcessor.from_pretrained`` read from a CLIP repo: the configs and
    tokenizer files at its top level and the safetensors weights (``model.safetensors``, or its shards)."""
    top = [f for f in repo_files if "/" not in f]
    found = sorted(f for f in top if _TRANSFORMERS_WEIGHTS.match(f))
    if not any(f.endswith(".safetensors") for f in found):
        raise ConfigError(
            f"model.path: {where} has no model.safetensors at its top level (pickled .bin weights are never "
            "loaded: loading them can run code). Fix: pick a CLIP repo that has them"
        )
    others = [
        f
        for f in top
        if f.endswith(_TRANSFORMERS_OTHERS) and f not in found and not f.endswith(".index.json")
    ]
    return sorted({CONFIG_FILE, *others}) + found


def select_lora_files(repo_files: list[str], where: str) -> list[str]:
    """The LoRA weights of a LoRA repo: diffusers' standard file (``pytorch_lora_weights.safetensors``)
    when the repo has it, else its one ``.safetensors`` file at the top level."""
    top = sorted(f for f in repo_files if "/" not in f and f.endswith(".safetensors"))
    if LORA_WEIGHTS in top:
        return [LORA_WEIGHTS]
    if len(top) == 1:
        return top
    if not top:
        raise ConfigError(
            f"model.path: {where} has no .safetensors LoRA weights at its top level (pickled .bin weights "
            "are never loaded: loading them can run code). Fix: pick a LoRA repo that has them"
        )
    listed = ", ".join(top[:5]) + (", ..." if len(top) > 5 else "")
    raise ConfigError(
        f"model.path: {where} holds {len(top)} .safetensors files ({listed}) and none is {LORA_WEIGHTS}, "
        "so which one to load is not clear. Fix: download the one you want and set generate.lora to its path"
    )
