"""``train.export_formats``: which files the export writes besides diffusers' own, and where each applies."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdcluster.config.checks import _choice, _require

if TYPE_CHECKING:
    from sdcluster.config.train import TrainConfig

EXPORT_FORMATS = {"diffusers": False, "kohya": True, "single_file": False}
"""``train.export_formats`` -> whether only a run that trains adapters has it: diffusers' own files (always
written: generation and the fused export read them), a LoRA in kohya's key names (ComfyUI, A1111), or the
whole model as one file in the original Stable Diffusion layout. The one place the schema names formats;
:data:`sdcluster.train.lora_formats.WRITERS` writes the LoRA ones, :mod:`sdcluster.train.single_file` the
model one."""

MODEL_FORMATS = ("single_file",)
"""Formats of a whole pipeline: written where the export is one (``model/``: a full run, or a LoRA run with
``train.lora.fuse_export=true``)."""

REQUIRED = "diffusers"
"""The format every export writes (generation and the fused export read it)."""


def check_export_formats(train: TrainConfig) -> None:
    """Known formats, diffusers' among them, and LoRA formats only for a run that trains adapters."""
    formats = train.export_formats
    for fmt in formats:
        _choice(fmt, "train.export_formats", tuple(EXPORT_FORMATS))
    _require(
        REQUIRED in formats,
        "train.export_formats",
        f"{formats} leaves out {REQUIRED}, which generation and the fused export read",
        f"keep it: train.export_formats=[{','.join([REQUIRED, *formats])}]",
    )
    lora_only = [fmt for fmt in formats if EXPORT_FORMATS[fmt] and not train.trains_adapters]
    _require(
        not lora_only,
        "train.export_formats",
        f"{', '.join(lora_only)} is a LoRA file format; train.method={train.method} trains no adapters",
        f"add train.method=lora to train a LoRA, or drop it: train.export_formats=[{REQUIRED}]",
    )
    unfused = train.trains_adapters and not train.lora.fuse_export
    whole = [fmt for fmt in formats if fmt in MODEL_FORMATS and unfused]
    _require(
        not whole,
        "train.export_formats",
        f"{', '.join(whole)} is a whole model in one file; train.method=lora exports adapters, not a model",
        "kohya is the single-file form of a LoRA (ComfyUI, A1111): train.export_formats=[diffusers,kohya]; "
        "or add train.lora.fuse_export=true to also export the model with the LoRA fused, as one file too",
    )
    _require(
        not train.export_fp16 or any(fmt in MODEL_FORMATS for fmt in formats),
        "train.export_fp16",
        f"halves the single-file checkpoint, but train.export_formats={formats} writes none",
        "add it: train.export_formats=[diffusers,single_file], or drop train.export_fp16",
    )
