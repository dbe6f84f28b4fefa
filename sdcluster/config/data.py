"""The ``data`` group (``conf/data/``): the captioned images to fine-tune on."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from omegaconf import MISSING

from sdcluster.config.checks import Schema, _require

SAMPLE_PROMPTS = (
    "A single pair of denim jeans laid flat on a white background, viewed from the front.",
    "A pair of faded denim jeans laid flat on a white background with a small black square marker.",
)
"""Captions in the style of the shipped sample data: the default validation and generation prompts."""


@dataclass
class BucketConfig(Schema):
    """Aspect-ratio buckets (``data.buckets``): each image is trained at the bucket size closest to its
    aspect ratio instead of one square crop (``sdcluster.data.buckets``; kohya's ``enable_bucket``)."""

    enabled: bool = False
    """Train each image at its aspect-ratio bucket; false: every image is cropped to one square."""
    side: int | None = None
    """The target area as a square's side (1024: buckets of at most 1024x1024 pixels); null:
    train.resolution."""
    step: int = 64
    """Bucket widths and heights are multiples of this (kohya's bucket_reso_steps); a multiple of 8."""
    max_aspect: float = 2.0
    """The aspect-ratio range: buckets from 1:max_aspect (portrait) to max_aspect:1 (landscape)."""

    def __post_init__(self) -> None:
        _require(
            self.step > 0 and self.step % 8 == 0,
            "data.buckets.step",
            f"must be a positive multiple of 8 (the VAE downsamples by 8), got {self.step}",
            "64 (kohya's and SimpleTuner's value), or 16 for tiny test models",
        )
        _require(
            self.side is None or self.side >= self.step,
            "data.buckets.side",
            f"must be at least data.buckets.step={self.step}, got {self.side}",
            "e.g. 512 or 1024, or null for train.resolution",
        )
        _require(
            self.max_aspect >= 1,
            "data.buckets.max_aspect",
            f"must be >= 1, got {self.max_aspect}",
            "e.g. 2.0 (buckets from 1:2 to 2:1); 1 keeps only the square",
        )


@dataclass
class SourceConfig(Schema):
    """One source of ``data.sources`` (``conf/data/sources.yaml``): a local imagefolder (images +
    ``metadata.jsonl``) or, with ``hub``, a hub dataset staged at launch like ``data=hub``; its images are
    read ``repeats`` times an epoch (``sdcluster.data.sources``)."""

    name: str = ""
    """A label that errors and logs name the source by (empty: its folder); with hub, its hub id
    (owner/name)."""
    path: str = ""
    """The source's folder of images + ``metadata.jsonl``; with hub, set by launch to the staged folder."""
    caption_column: str = "text"
    """The key of this source's ``metadata.jsonl`` (or its hub dataset's column) that holds the captions."""
    repeats: int = 1
    """Times each of the source's images is read an epoch (kohya's num_repeats): 2 doubles its weight."""
    holdout: int | None = None
    """Images of this source kept out of training for the validation loss; null: data.holdout."""
    hub: bool = False
    """name is a dataset on the Hugging Face hub, staged at launch; false: path is a local folder."""
    revision: str = "main"
    """With hub: the branch, tag or commit of the dataset repo."""
    commit: str | None = None
    """With hub: the commit launch resolved revision to (set by launch; names the run)."""
    split: str = "train"
    """With hub: the split of the dataset to train on."""
    image_column: str = "image"
    """With hub: the column that holds the images."""

    def label(self, index: int) -> str:
        """How errors name the source: ``data.sources[1] (reg)``."""
        return f"data.sources[{index}] ({self.name or self.path or 'unnamed'})"


@dataclass
class DataConfig(Schema):
    """A captioned image folder in the ``datasets`` imagefolder layout (images + ``metadata.jsonl``)."""

    name: str = "sample"
    """Short name of the dataset (the ``conf/data/`` option), or with data.hub its hub id (owner/name); part
    of the run's identity."""
    path: str = MISSING
    """The folder of images + ``metadata.jsonl``; no default (``data=sample`` ships one): data.path=DIR."""
    caption_column: str = "text"
    """The key of ``metadata.jsonl`` that holds each image's caption (with data.hub: the dataset's column)."""
    max_pixels: int = 40_000_000
    """Larger images are refused at launch (huge or decompression-bomb files); raise it for big photos."""
    num_workers: int = 0
    """DataLoader worker processes per rank; 0 loads in-process. The batches are the same for any value."""
    cache: bool = True
    """Encode latents and caption embeddings once per dataset and reuse them (those encoders are frozen)."""
    cache_memory_mb: int = 1024
    """A latent cache up to this size is held in RAM, a larger one is memory-mapped; 0 reads it from disk."""
    cache_shards: int = 1
    """The array tasks that build the latent cache, each a share of the images (a killed or preempted build
    keeps the shares it finished): with task=cache alone, or above 1 queued ahead of a training job, which
    waits on the array and reads the finished cache; 1 with a training task: the training job builds it."""
    holdout: int = 0
    """Images kept out of training for the validation loss; 0 trains on all (validates on training ones)."""
    max_samples: int | None = None
    """Train on only the first N images (by file name) of the training split; null: all of them."""
    caption_dropout: float = 0.0
    """Probability that an example's caption is dropped for the unconditional one (what the pipeline uses
    for an empty prompt), so classifier-free guidance keeps working on the fine-tuned model; 0: never."""
    buckets: BucketConfig = field(default_factory=BucketConfig)
    """Aspect-ratio buckets (off by default: every image is cropped to one train.resolution square)."""
    hub: bool = False
    """data.name is a dataset on the Hugging Face hub (``data=hub data.name=owner/name``): launch stages it
    and sets data.path to the staged folder; false: data.path is a local folder."""
    revision: str = "main"
    """With data.hub: the branch, tag or commit of the dataset repo to train on."""
    commit: str | None = None
    """With data.hub: the commit launch resolved data.revision to (set by launch; names the run)."""
    split: str = "train"
    """With data.hub: the split of the dataset to train on (as ``datasets`` names it)."""
    image_column: str = "image"
    """With data.hub: the column that holds the images (a ``datasets`` Image feature)."""
    cache_dir: str | None = None
    """With data.hub: where launch stages the dataset and jobs read it (storage every node sees); null:
    Hugging Face's hub cache (``HF_HUB_CACHE``)."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Several sources, each a folder or a hub dataset with its own repeats and caption column
    (``data=sources``, docs/reference/data.md); empty: the one folder data.path (or hub dataset)."""
    snapshot: str | None = None
    """Set by launch: the digest of what it checked (each image's name, caption, sha256 and size), kept under
    ``<cache_root>/data_snapshots/``. A job whose latent cache is complete reads that and the cache, not the
    folder; one that reads images checks them against it. Null: the job reads the folder at its start."""

    NOT_IDENTITY: ClassVar[tuple[str, ...]] = (
        "num_workers",
        "cache",
        "cache_memory_mb",
        "cache_shards",
        "max_pixels",
        "cache_dir",
        "snapshot",
    )
    """Keys that do not change what a run learns: changing one keeps the run folder (and so resumes it)."""
    IDENTITY_WHEN_SET: ClassVar[tuple[str, ...]] = ("max_samples", "caption_dropout")
    """Keys that join the run's identity only when set to something other than their default, so that runs
    from before the key existed keep their folders."""
    HUB_ONLY: ClassVar[tuple[str, ...]] = ("hub", "revision", "commit", "split", "image_column")
    """Keys of a hub dataset: in the identity of a hub run only (a folder run's hash stays as it was), where
    ``commit`` stands for ``revision`` and ``path`` (the staged folder: where the cache lives) is left out."""

    def __post_init__(self) -> None:
        _require(self.max_pixels > 0, "data.max_pixels", "must be > 0", "set a positive pixel limit")
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0", "use 0 for in-process loading")
        _require(
            self.cache_memory_mb >= 0, "data.cache_memory_mb", "must be >= 0", "0 reads the cache from disk"
        )
        _require(self.cache_shards >= 1, "data.cache_shards", "must be >= 1", "e.g. 16 array tasks")
        _require(
            self.holdout >= 0, "data.holdout", "must be >= 0", "images kept out of training for validation"
        )
        _require(
            self.max_samples is None or self.max_samples > 0,
            "data.max_samples",
            f"must be > 0, got {self.max_samples}",
            "the number of training images to use, or null for all",
        )
        _require(
            0 <= self.caption_dropout < 1,
            "data.caption_dropout",
            f"must be in [0, 1), got {self.caption_dropout}",
            "e.g. 0.1 (kohya's and SimpleTuner's usual value), or 0 to keep every caption",
        )
        _require(
            not self.hub or re.fullmatch(r"[\w.-]+/[\w.-]+", self.name) is not None,
            "data.name",
            f"with data=hub it is the dataset's hub id, got {self.name!r}",
            "data=hub data.name=owner/name (as on huggingface.co/datasets/owner/name)",
        )
        _require(
            not (self.sources and self.hub),
            "data.sources",
            "is set together with data.hub (one hub dataset in place of the sources)",
            "list the hub dataset as a source (hub: true, name: owner/name) and drop data=hub",
        )
        _require(
            not (self.sources and self.path),
            "data.path",
            f"is not read when data.sources is set (each source names its own folder), got {self.path!r}",
            f"list it as a source ('data.sources=[..., {{path: {self.path}}}]') or drop data.path",
        )
        for index, source in enumerate(self.sources):
            _check_source(source, index)


def _check_source(source: SourceConfig, index: int) -> None:
    """Each source's settings, named by its place in the list (``data.sources[1] (reg)``)."""
    if not isinstance(source, SourceConfig):  # a plain dict where the schema was bypassed
        return
    where = source.label(index)
    _require(
        source.repeats >= 1,
        f"{where}.repeats",
        f"must be >= 1, got {source.repeats}",
        "1 reads each image once an epoch, 2 twice; drop the source to leave it out",
    )
    _require(
        source.holdout is None or source.holdout >= 0,
        f"{where}.holdout",
        f"must be >= 0 or null, got {source.holdout}",
        "images of this source kept out of training, or null for data.holdout",
    )
    _require(
        bool(source.path) or source.hub,
        f"{where}.path",
        "is empty: the source names no folder",
        "path: DIR (images + metadata.jsonl), or hub: true with name: owner/name",
    )
    _require(
        not source.hub or re.fullmatch(r"[\w.-]+/[\w.-]+", source.name) is not None,
        f"{where}.name",
        f"with hub: true it is the dataset's hub id, got {source.name!r}",
        "name: owner/name (as on huggingface.co/datasets/owner/name)",
    )
