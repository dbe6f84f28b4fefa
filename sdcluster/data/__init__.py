"""The data wing (``conf/data/``): captioned image folders, from ``metadata.jsonl`` to training batches.

``reader`` is the one reader of ``metadata.jsonl`` (for validate, prepare and the job alike), ``metadata``
prepares and validates a folder (Pillow only, so the login node checks it without torch; also ``python -m
sdcluster.data``), ``image_checks`` says which files may be read at all (the same rule in the job),
``dataset`` loads a folder with ``datasets`` and augments, ``split`` holds images out for validation (and cuts
the training split to ``data.max_samples``), ``epochs`` counts ``train.epochs`` into optimizer steps before
submission, ``snapshot`` pins what the launch checked (each image's name, caption, sha256 and size) so that a
job reads that instead of the folder, ``hub`` stages a hub dataset at launch and ``hub_folder`` writes it out
as a folder (so everything below reads a folder), ``sources`` reads several folders and hub datasets as one
table (``data.sources``: repeats, per-source holdout and checks), ``buckets`` makes the aspect-ratio buckets
and assigns each image one (Pillow only), ``sampler`` fixes which example each micro-step reads (so resume is
exact), ``latent_cache`` owns the cached encoder outputs and their on-disk format (``latent_plan`` plans an
entry, ``latent_build`` fills it), ``loader`` gives the training loop its batches, and ``sample`` draws the
shipped sample set. The models that encode live in :mod:`sdcluster.models`; the loss in
:mod:`sdcluster.train`. ``dataset`` and ``sampler`` are imported lazily on first use: they import torch and
datasets, which the login node's checks do without.

Above models (the family encodes, the cache keys the model) and the runtime's base (which rank builds a
cache entry), below generate and train.

May import (command: __main__): ``data``, ``compose``, ``config``.

May import (the rest): ``config``, ``models``, ``runtime.distributed``, ``runtime.ownership``,
``runtime.requeue``, ``runtime.step_events``, ``atomic``, ``derive``, ``identity``, ``model_source``,
``paths``, ``progress``, ``sealed``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sdcluster.data.metadata import (
    METADATA_FILE,
    MetadataError,
    PrepareReport,
    list_images,
    prepare,
    read_metadata,
    validate,
    write_metadata,
)
from sdcluster.data.reader import IMAGE_EXTENSIONS, Problem, Row, scan

if TYPE_CHECKING:
    from sdcluster.data.dataset import TrainImages, augment, collate, load_captioned_images
    from sdcluster.data.sampler import BucketSampler, StepSampler, aug_seed_of, position_to_epoch

_LAZY = {
    "TrainImages": "dataset",
    "augment": "dataset",
    "collate": "dataset",
    "load_captioned_images": "dataset",
    "StepSampler": "sampler",
    "BucketSampler": "sampler",
    "aug_seed_of": "sampler",
    "position_to_epoch": "sampler",
}

__all__ = [
    "IMAGE_EXTENSIONS",
    "METADATA_FILE",
    "BucketSampler",
    "MetadataError",
    "PrepareReport",
    "Problem",
    "Row",
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
    "scan",
    "validate",
    "write_metadata",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"sdcluster.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sdcluster.data' has no attribute {name!r}")
