"""``train.export_formats``: which files the export writes besides diffusers' own, and where each applies."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdcluster.config.checks import _choice, _require

if TYPE_CHECKING:
    from sdcluster.config.train import TrainConfig

EXPORT_FORMATS = {"diffusers": False, "kohya": True}
"""``train.export_formats`` -> whether only a run that trains adapters has it: diffusers' own files (always
written: generation and the fused export read them), or a LoRA in kohya's key names (ComfyUI, A1111). The
one place the schema names formats; :data:`sdcluster.train.lora_formats.WRITERS` writes the extra ones."""

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
