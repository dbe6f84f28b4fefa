"""LoRA files for other tools: the exported diffusers file in kohya's key names (``train.export_formats``).

ComfyUI, AUTOMATIC1111/Forge and InvokeAI load LoRA files in the key names of kohya's sd-scripts
(``lora_unet_..._to_q.lora_down.weight``, ``lora_te_...``, one ``.alpha`` per module); diffusers' own file is
a known source of "lora key not loaded" there. The kohya file is made from the diffusers file the export has
just written (so both hold the same tensors) with diffusers' conversion utilities; what they get wrong for
this is fixed here, each fix saying why. diffusers' ``load_lora_weights`` reads kohya keys, which is how the
tests check that both files give the same model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdcluster.config.generate import LORA_WEIGHTS

log = logging.getLogger("sdcluster")

KOHYA_SUFFIX = "_kohya.safetensors"
"""A kohya file is named ``<run folder name>_kohya.safetensors``: it names the run in a tool's LoRA list,
and never ends in diffusers' ``pytorch_lora_weights.safetensors`` (which ``load_lora_weights`` prefers)."""

_DENOISER = "unet"  # kohya's format has keys for a UNet (lora_unet_) and CLIP text encoders (lora_te*_)
_METADATA = "lora_adapter_metadata"  # where save_lora_weights keeps each component's peft config
_TEXT_MODEL = "text_model."


def _component_states(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The diffusers file's tensors by component (``unet``, ``text_encoder``, ``text_encoder_2``), in peft's
    key names (``lora_A``/``lora_B``): the names ``convert_state_dict_to_kohya`` reads.

    The file names the UNet's attention adapters ``lora.down``/``lora.up`` and a text encoder's
    ``lora_linear_layer.down``/``up`` (other UNet targets keep peft's names): each has its own converter."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    by_component: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        component, rest = key.split(".", 1)
        by_component.setdefault(component, {})[rest] = tensor
    return {
        name: convert_unet_state_dict_to_peft(part)
        if name == _DENOISER
        else convert_state_dict_to_peft(part, original_type=StateDictType.DIFFUSERS)
        for name, part in by_component.items()
    }


def _with_text_model(part: dict[str, Any]) -> dict[str, Any]:
    """A text encoder's keys under CLIP's ``text_model.``: transformers 5 dropped that module from
    ``CLIPTextModel``, but every kohya reader (sd-scripts, ComfyUI, A1111, diffusers' own) matches the
    ``lora_te_text_model_encoder_layers_...`` names that the CLIP weights have always had."""
    return {k if k.startswith(_TEXT_MODEL) else _TEXT_MODEL + k: v for k, v in part.items()}


def _alphas(metadata: dict[str, str] | None) -> dict[str, float]:
    """Each component's trained ``lora_alpha`` from the diffusers file's metadata.

    diffusers' ``convert_state_dict_to_kohya`` writes every ``.alpha`` as the rank (``len(weight)``): the
    trained scale alpha / rank would be lost, and the file would load at scale 1 (an export once dropped
    alpha like this). A file without the metadata loads in diffusers at alpha = rank, so that is kept.
    """
    config = json.loads((metadata or {}).get(_METADATA, "{}"))
    found: dict[str, float] = {}
    for key, value in config.items():
        component, field = key.split(".", 1)
        if field in ("alpha_pattern", "rank_pattern") and value:
            # one alpha per component is what training sets; per-module patterns would need one per key
            raise ValueError(f"{component}: per-module {field} cannot be written as kohya alphas")
        if field == "lora_alpha":
            found[component] = float(value)
    return found


def kohya_state_dict(state: dict[str, Any], metadata: dict[str, str] | None) -> dict[str, Any]:
    """The kohya state dict of a diffusers LoRA file's ``state`` and ``metadata``, trained alphas kept."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya

    alphas = _alphas(metadata)
    parts = _component_states(state)
    encoders = [name for name in parts if name != _DENOISER]
    kohya: dict[str, Any] = {}
    for component, part in parts.items():
        part = _with_text_model(part) if component in encoders else part
        prefixed = {f"{component}.{k}": v for k, v in part.items()}
        converted = convert_state_dict_to_kohya(prefixed)
        for key in [k for k in converted if k.endswith(".alpha")]:
            rank = float(converted[key])
            converted[key] = torch.tensor(alphas.get(component, rank), dtype=torch.float32)
        kohya.update(converted)
    if len(encoders) == 1:
        # kohya's sd-scripts name a single text encoder lora_te_ (SD 1.x/2.x) and keep lora_te1_/lora_te2_
        # for two (SDXL); diffusers writes lora_te1_ for either, a spelling SD 1.x files never had.
        kohya = {k.replace("lora_te1_", "lora_te_", 1): v for k, v in kohya.items()}
    return kohya


def _kohya_metadata(kohya: dict[str, Any]) -> dict[str, str]:
    """The few ``ss_*`` fields of sd-scripts' files that A1111 shows (network module, dim, alpha)."""
    downs = [v for k, v in kohya.items() if k.startswith("lora_unet") and k.endswith("lora_down.weight")]
    alphas = [float(v) for k, v in kohya.items() if k.startswith("lora_unet") and k.endswith(".alpha")]
    meta = {"ss_network_module": "networks.lora"}
    if downs:
        meta["ss_network_dim"] = str(downs[0].shape[0])
    if alphas:
        meta["ss_network_alpha"] = f"{alphas[0]:g}"
    return meta


def write_kohya(export: Path, name: str) -> Path:
    """Write ``<name>_kohya.safetensors`` beside the diffusers file in ``export``; returns its path."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source = export / LORA_WEIGHTS
    state = load_file(str(source))
    with safe_open(str(source), framework="pt") as fh:
        metadata = fh.metadata()
    kohya = kohya_state_dict(state, metadata)
    dest = export / f"{name}{KOHYA_SUFFIX}"
    save_file({k: v.contiguous() for k, v in kohya.items()}, str(dest), _kohya_metadata(kohya))
    log.info("exported LoRA in kohya's key names (ComfyUI, A1111): %s", dest.name)
    return dest


WRITERS: dict[str, Callable[[Path, str], Path]] = {"kohya": write_kohya}
"""``train.export_formats`` names -> the writer of that LoRA format (diffusers' own file is the export
itself); :data:`sdcluster.config.export_formats.EXPORT_FORMATS` names the same formats (a test keeps them
in step)."""


def write_run_formats(export: Path, run_root: Path) -> list[Path]:
    """Write the extra LoRA formats the run in ``run_root`` asked for (``train.export_formats``, from its
    ``config.yaml``) into the staging folder ``export``, each named after the run folder."""
    from sdcluster.train.model_card import run_config

    cfg = run_config(run_root)
    formats = cfg.train.export_formats if cfg is not None else []
    return [WRITERS[fmt](export, run_root.name) for fmt in formats if fmt in WRITERS]
