"""Captioned image folders: prepare and validate ``metadata.jsonl``, load it, feed it to training.

``metadata`` and the CLI need only Pillow, so the login node can check a folder without importing torch;
``dataset`` and ``sampler`` are imported lazily on first use for the same reason.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sdcluster.data.metadata import (
    IMAGE_EXTENSIONS,
    METADATA_FILE,
    MetadataError,
    PrepareReport,
    Problem,
    list_images,
    prepare,
    read_metadata,
    validate,
    write_metadata,
)

if TYPE_CHECKING:
    from sdcluster.data.dataset import TrainImages, augment, collate, load_captioned_images
    from sdcluster.data.sampler import StepSampler, aug_seed_of, position_to_epoch

_LAZY = {
    "TrainImages": "dataset",
    "augment": "dataset",
    "collate": "dataset",
    "load_captioned_images": "dataset",
    "StepSampler": "sampler",
    "aug_seed_of": "sampler",
    "position_to_epoch": "sampler",
}

__all__ = [
    "IMAGE_EXTENSIONS",
    "METADATA_FILE",
    "MetadataError",
    "PrepareReport",
    "Problem",
    "StepSampler",
    "TrainImages",
    "aug_seed_of",
    "augment",
    "collate",
    "list_images",
    "load_captioned_images",
    "position_to_epoch",
    "prepare",
    "read_metadata",
    "validate",
    "write_metadata",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"sdcluster.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sdcluster.data' has no attribute {name!r}")
