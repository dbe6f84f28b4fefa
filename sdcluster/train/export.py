"""Export what a run trained so that it loads without sdcluster: a diffusers pipeline, or a LoRA file (and the
other tools' formats ``train.export_formats`` asks for: kohya LoRA keys, a single-file checkpoint).

Every export is written to a temporary folder and published in one rename, so the destination is either
the previous or the new export. Frozen components (VAE, text encoder, tokenizer, scheduler) are read again
from the source as it was published, not taken from the training process, where mixed precision cast
them to fp16/bf16; the text encoders of a local source are copied as files, not loaded (a cached run never
loads them). The safety checker is left out (a research export).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdcluster import atomic
from sdcluster.config import ModelConfig
from sdcluster.model_source import is_local
from sdcluster.train import lora_formats, model_card, single_file
from sdcluster.train.ema import ema_weights

if TYPE_CHECKING:
    import torch

    from sdcluster.models.family import Family
    from sdcluster.models.objectives import Objective
    from sdcluster.train.ema import LerpEMA

log = logging.getLogger("sdcluster")

_RESUME = ": it exports from the last checkpoint"
ORIGIN_FILE = "sdcluster-model.json"  # the hub id, revision and commit trained from (models.hub.origin)
_ADAPTER = "default"  # the name peft gives the one adapter training adds (method.LoRA.prepare)


def _base_pipeline(family: Family, source: str, model: ModelConfig, **parts: Any) -> Any:
    """The source pipeline of ``family`` (safetensors only), with ``parts`` (e.g. a trained denoiser) in place
    of its own, and the VAE of ``model.vae_path`` when one is set (the VAE the run trained with)."""
    if model.vae_path and "vae" not in parts:
        from sdcluster.models.load import load_vae_override

        parts["vae"] = load_vae_override(model)
    return family.pipeline_class.from_pretrained(
        source,
        revision=model.revision,
        variant=model.variant,
        use_safetensors=True,
        **family.pipeline_kwargs(),
        **parts,
    )


# What an encoder's folder holds that loading it without a variant reads: its configs and its safetensors
# weights (one file, or shards and their index); not another variant's files, never a pickle.
_ENCODER_FILE = re.compile(
    r"(generation_)?config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
)


def _copied_encoders(family: Family, source: str, model: ModelConfig) -> list[str]:
    """The text encoders a full export copies as files instead of loading: every one of a local source
    without a ``model.variant`` (a cached run has not loaded them, and T5-XXL is 9.4 GB to read just to
    write it out again); a hub id (a caller that skipped staging) or a variant's files are loaded."""
    if model.variant or not is_local(source):
        return []
    return [name for name in family.text_encoder_classes if (Path(source) / name / "config.json").is_file()]


def _copy_encoders(names: list[str], source: str, tmp: Path) -> None:
    """Copy each encoder's folder (the files :data:`_ENCODER_FILE` matches, links followed) into the export
    and name it in ``model_index.json`` as the source does (the pipeline was saved without it)."""
    if not names:
        return
    index = json.loads((Path(source) / "model_index.json").read_text())
    written = json.loads((tmp / "model_index.json").read_text())
    for name in names:
        (tmp / name).mkdir()
        for path in sorted((Path(source) / name).iterdir()):
            if _ENCODER_FILE.fullmatch(path.name):
                shutil.copyfile(path, tmp / name / path.name)
        written[name] = index[name]
    atomic.write_json(tmp / "model_index.json", written)


def _save(pipe: Any, tmp: Path, objective: Objective) -> None:
    objective.configure(pipe.scheduler)  # what the denoiser was trained to predict, not what the source says
    pipe.save_pretrained(tmp, safe_serialization=True)


@contextmanager
def _publishing(dest: Path, origin: dict[str, Any] | None) -> Iterator[Path]:
    """A staging folder that becomes ``dest`` when the block succeeds (a full disk is explained); with
    ``origin`` (a hub model), the export says which commit it was trained from."""
    tmp = atomic.staging_dir(dest)
    with atomic.explain_disk_full(dest, tmp, _RESUME):
        yield tmp
        if origin is not None:
            atomic.write_json(tmp / ORIGIN_FILE, origin)
    atomic.publish_dir(tmp, dest)


def export_pipeline(
    dest: Path,
    family: Family,
    source: str,
    denoiser: torch.nn.Module,
    ema: LerpEMA | None,
    params: list[Any],
    objective: Objective,
    model: ModelConfig,
    origin: dict[str, Any] | None = None,
) -> Path:
    """Write the family's pipeline (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``) with the
    trained denoiser (its EMA weights when EMA is on).

    ``params`` are the parameters the EMA averages; ``objective`` (the run's) configures the exported
    scheduler; ``model`` gives the source's revision, variant and ``vae_path``.
    """
    copied = _copied_encoders(family, source, model)
    with _publishing(dest, origin) as tmp, ema_weights(ema, params):
        parts = {family.denoiser_name: denoiser, **dict.fromkeys(copied)}  # None: not loaded
        _save(_base_pipeline(family, source, model, **parts), tmp, objective)
        _copy_encoders(copied, source, tmp)
        single_file.write_run_single_file(tmp, dest.parent)  # train.export_formats, made from that folder
        model_card.write_card(tmp, dest.parent, family)  # the run folder (dest's parent) describes it
    log.info("exported pipeline (%s weights): %s", "EMA" if ema is not None else "trained", dest)
    return dest


def export_lora(
    dest: Path,
    family: Family,
    denoiser: torch.nn.Module,
    text_encoders: dict[str, Any],
    ema: LerpEMA | None,
    params: list[Any],
    origin: dict[str, Any] | None = None,
) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` as diffusers' LoRA examples do, EMA adapters when EMA is on.

    peft's state dict is converted to diffusers' key names and saved with the pipeline's own
    ``save_lora_weights``, so a plain ``pipeline.load_lora_weights(dest)`` loads it, on any copy of the
    base model. ``text_encoders`` maps each adapted text encoder to the name its layers are saved under.

    Each module's adapter config goes into the file's metadata (``lora_adapter_metadata``, as diffusers'
    own training examples write it): the tensors alone do not say ``lora_alpha``, and without it
    ``load_lora_weights`` would apply the adapters at alpha = rank, not at the trained alpha / rank.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    with _publishing(dest, origin) as tmp, ema_weights(ema, params):
        layers: dict[str, Any] = {}
        for name, module in {family.denoiser_name: denoiser, **text_encoders}.items():
            state = get_peft_model_state_dict(module)
            layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(state)
            layers[f"{name}_lora_adapter_metadata"] = module.peft_config[_ADAPTER].to_dict()
        family.pipeline_class.save_lora_weights(tmp, safe_serialization=True, **layers)
        lora_formats.write_run_formats(tmp, dest.parent)  # train.export_formats, made from that file
        model_card.write_card(tmp, dest.parent, family)
    log.info("exported LoRA (%s adapters): %s", "EMA" if ema is not None else "trained", dest)
    return dest


def export_fused(
    dest: Path,
    family: Family,
    source: str,
    lora: Path,
    objective: Objective,
    model: ModelConfig,
    origin: dict[str, Any] | None = None,
) -> Path:
    """A full pipeline with the LoRA in ``lora`` fused into its weights, for tools without LoRA support.

    Built the documented way (load the base, ``load_lora_weights``, ``fuse_lora``, ``unload_lora_weights``),
    from the exported file itself, so the fused model is exactly what that file gives at scale 1.
    """
    with _publishing(dest, origin) as tmp:
        pipe = _base_pipeline(family, source, model)
        pipe.load_lora_weights(str(lora))
        pipe.fuse_lora(lora_scale=1.0)
        pipe.unload_lora_weights()
        _save(pipe, tmp, objective)
        single_file.write_run_single_file(tmp, dest.parent)
        model_card.write_card(tmp, dest.parent, family)
    log.info("exported pipeline with the LoRA fused: %s", dest)
    return dest
