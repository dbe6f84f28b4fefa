"""The ``generate`` group (``conf/generate/``): images from the fine-tuned (or any) pipeline."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from sdcluster.config.checks import MIXED_PRECISION, SCHEDULERS, Schema, _choice, _require
from sdcluster.config.data import SAMPLE_PROMPTS
from sdcluster.model_source import is_hub_id, is_single_file, looks_like_hub_id

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _check_commit(value: str | None, key: str, repo_key: str) -> None:
    _require(
        value is None or bool(_COMMIT.match(value)),
        key,
        f"{value!r} is not a full commit sha (40 lowercase hex digits)",
        f"copy the full sha, or drop {key} (launch pins what {repo_key}'s main points at)",
    )


@dataclass
class ScoresConfig(Schema):
    """Per-image scores recorded in the manifest (``generate.scores``), computed batched in the job."""

    clip: bool = False
    """Record the CLIP image-text similarity of each image with its prompt (loads a CLIP model)."""
    clip_model: str = "openai/clip-vit-base-patch32"
    """The CLIP model: a hub id or folder (transformers' CLIPModel); ``tiny``: the built-in test one. A hub id
    is staged at launch like the base model (``model.cache_dir``) and read by the job with the hub off."""
    clip_commit: str | None = None
    """The hub commit a hub ``clip_model`` is pinned to; launch fills it in (from ``main``) and points the
    job at that snapshot's folder."""
    phash: bool = True
    """Record a 64-bit DCT perceptual hash of each image (cheap; finds near-duplicates at merge)."""
    duplicate_distance: int = 4
    """Two images whose hashes differ in at most this many of 64 bits are near-duplicates."""

    def __post_init__(self) -> None:
        _require(
            self.clip_model == "tiny"
            or Path(self.clip_model).expanduser().is_dir()
            or looks_like_hub_id(self.clip_model),
            "generate.scores.clip_model",
            f"{self.clip_model!r} is neither a folder nor a hub id (owner/name)",
            "e.g. openai/clip-vit-base-patch32, a folder saved by CLIPModel.save_pretrained, or tiny",
        )
        _check_commit(self.clip_commit, "generate.scores.clip_commit", "generate.scores.clip_model")
        _require(
            0 <= self.duplicate_distance <= 64,
            "generate.scores.duplicate_distance",
            f"must be within 0..64 bits, got {self.duplicate_distance}",
            "e.g. 4 (0: identical hashes only)",
        )


@dataclass
class FilterConfig(Schema):
    """Which images are set aside in ``rejected/`` at merge (``generate.filter``); nothing is deleted."""

    min_clip: float | None = None
    """Reject images whose CLIP similarity to their prompt is below this (e.g. 0.2); null: keep all."""
    drop_near_duplicates: bool = False
    """Reject each near-duplicate of an earlier kept image (the lowest (prompt, image) index is kept)."""

    def __post_init__(self) -> None:
        _require(
            self.min_clip is None or -1 <= self.min_clip <= 1,
            "generate.filter.min_clip",
            f"a cosine similarity lies in [-1, 1], got {self.min_clip}",
            "e.g. 0.2, or null to keep every image",
        )


SPLITS = ("none", "slot", "fraction")
"""``generate.split.by``: no split, by a slot's values, or a seeded share of the images."""
_IMAGE_ID = re.compile(r"^p\d{4,}-i\d{4,}(\.png)?$")


@dataclass
class SplitConfig(Schema):
    """How the finished folder is also written as train/ and validation/ splits (links to the images)."""

    by: str = "none"
    """none: one dataset; slot: by ``slot``'s values; fraction: a seeded ``fraction`` of the images."""
    slot: str | None = None
    """With by=slot: the slot of the prompts program whose values decide the split, e.g. view."""
    validation: list[str] = field(default_factory=list)
    """With by=slot: the slot values whose images go to validation/, e.g. [back]."""
    fraction: float = 0.1
    """With by=fraction: the share of images in validation/, drawn per image from ``seed``."""
    seed: int = 0
    """With by=fraction: which images are drawn; the same seed gives the same split for any shard count."""

    def __post_init__(self) -> None:
        _choice(self.by, "generate.split.by", SPLITS)
        if self.by == "slot":
            _require(bool(self.slot), "generate.split.slot", "missing with by=slot", "e.g. slot=view")
            _require(
                bool(self.validation),
                "generate.split.validation",
                "empty with by=slot",
                "list the slot values for validation/, e.g. generate.split.validation=[back]",
            )
        if self.by == "fraction":
            _require(
                0 < self.fraction < 1,
                "generate.split.fraction",
                f"must be between 0 and 1, got {self.fraction}",
                "e.g. 0.1",
            )


PROGRAM_SUFFIXES = (".yaml", ".yml")
"""A ``generate.prompts_file`` with one of these suffixes is a prompt program; else one prompt a line."""


def is_program_file(path: str | Path | None) -> bool:
    """Whether ``generate.prompts_file`` names a prompt program (:mod:`sdcluster.generate.prompts`)."""
    return path is not None and Path(path).suffix.lower() in PROGRAM_SUFFIXES


@dataclass
class GenerateConfig(Schema):
    """Batched generation: P prompts x ``num_images`` each, in batches of ``batch_size``."""

    prompts: list[str] = field(default_factory=lambda: list(SAMPLE_PROMPTS))
    """Prompts to render, each num_images times; the defaults describe the shipped sample data. With a prompt
    program as ``prompts_file`` (``.yaml``) the defaults are dropped; prompts given here join the program as
    literal templates (a list equal to the defaults counts as the defaults)."""
    prompts_file: str | None = None
    """A text file of prompts, one a line, added after ``prompts``; for long lists."""
    negative_prompt: str | None = None
    """What the images should not show (guidance steers away from it); null: none."""
    num_images: int = 2
    """Images per prompt; each image's seed comes from (seed, prompt index, image index)."""
    batch_size: int = 4
    """Images per pipeline call: changes speed and memory, not the images (nor their folder)."""
    steps: int = 20
    """Denoising steps per image: more is slower and usually cleaner."""
    guidance_scale: float = 7.5
    """Classifier-free guidance: higher follows the prompt more closely; 1 or less turns it off. The model
    option sets its family's own (``model=flux_dev``: 3.5, FLUX.1-dev's embedded guidance; ``sd35_*``: the
    model card's); 7.5 is SD 1.x/SDXL's."""
    height: int | None = None
    """Image height in pixels, a multiple of 8; null: the model's default size."""
    width: int | None = None
    """Image width in pixels, a multiple of 8; null: the model's default size."""
    scheduler: str = "ddim"
    """The sampler (also of the validation images): same weights, different speed and look."""
    seed: int = 0
    """Base seed of every image's own seed, so an image can be reproduced alone."""
    model: str | None = None
    """A diffusers pipeline to generate from: a folder, or a hub id (``owner/name``, staged at launch like
    the base model, into ``model.cache_dir``), or a single-file checkpoint (a local ``.safetensors`` in the
    original Stable Diffusion layout, as ComfyUI and A1111 load; see ``model_config``); null: this run's
    exported fine-tuned model."""
    model_config: str | None = None
    """With a single-file ``model``: the diffusers pipeline folder of the same family whose configs,
    tokenizers and scheduler go with its weights (e.g. the base model's folder); null: the base model
    (``model.path``, e.g. ``model=sd15`` or ``model=sdxl``, staged at launch when it is a hub model)."""
    model_commit: str | None = None
    """The hub commit a hub ``model`` is pinned to; launch fills it in (from ``main``); set it to pin one you
    know. Names the images' folder in place of ``main``."""
    lora: str | None = None
    """LoRA weights put on the model: a folder holding ``pytorch_lora_weights.safetensors``, a
    ``.safetensors`` file (diffusers' or kohya's key names, as ComfyUI/A1111 LoRAs have), or a hub id (its
    ``pytorch_lora_weights.safetensors``, or its one ``.safetensors`` file; staged at launch); null: none,
    except after a ``train.method=lora`` run (its own adapters)."""
    lora_commit: str | None = None
    """The hub commit a hub ``lora`` is pinned to; launch fills it in (from ``main``). Names the images'
    folder."""
    lora_scale: float = 1.0
    """How strongly the LoRA acts: 1 as trained, 0 the base model alone, in between a blend."""
    mixed_precision: str = "no"
    """Generate in fp16 or bf16 on a GPU (ignored on CPU); no: float32."""
    shards: int = 1
    """Split the images over this many jobs (a job array); the files are the same for any count."""
    max_images: int = 10_000_000
    """The most images one launch may make (every template's prompts x images, counted before anything is
    queued, never listed); above it the launch is refused. Raise it for a bigger run, or split the program."""
    split: SplitConfig = field(default_factory=SplitConfig)
    """Also write the finished images as train/ and validation/ dataset splits; by=none: one dataset."""
    only: str | None = None
    """Make just this image of the plan (e.g. p0003-i0007), into its own folder: an image's remake command."""
    scores: ScoresConfig = field(default_factory=ScoresConfig)
    """Per-image scores recorded in the manifest: CLIP similarity (off by default) and perceptual hash."""
    filter: FilterConfig = field(default_factory=FilterConfig)
    """Set low-scoring and near-duplicate images aside in ``rejected/`` when the manifest is merged."""
    redo_rejected: bool = False
    """Make rejected images again (old copies move to ``rejected/previous/``); false: they count as done."""

    NOT_IDENTITY: ClassVar[tuple[str, ...]] = (
        "batch_size",
        "shards",
        "max_images",
        "scores",
        "filter",
        "redo_rejected",
        "split",
    )
    """Keys that do not change the pixels, so not part of the folder's identity: a new filter re-judges the
    same images instead of making a new folder, a new split re-exports them."""

    def __post_init__(self) -> None:
        _require(self.num_images > 0, "generate.num_images", "must be > 0", "images per prompt, e.g. 8")
        _require(self.batch_size > 0, "generate.batch_size", "must be > 0", "e.g. 8")
        _require(self.steps > 0, "generate.steps", "must be > 0", "e.g. 30")
        _require(self.guidance_scale >= 0, "generate.guidance_scale", "must be >= 0", "e.g. 7.5")
        for key in ("height", "width"):
            value = getattr(self, key)
            _require(
                value is None or (value > 0 and value % 8 == 0),
                f"generate.{key}",
                f"must be a positive multiple of 8, got {value}",
                "e.g. 512, or null for the model's default",
            )
        _choice(self.scheduler, "generate.scheduler", SCHEDULERS)
        _choice(self.mixed_precision, "generate.mixed_precision", MIXED_PRECISION)
        _require(self.shards > 0, "generate.shards", "must be > 0", "use 1 for a single job")
        _require(self.max_images > 0, "generate.max_images", "must be > 0", "e.g. 10000000")
        _require(
            self.only is None or bool(_IMAGE_ID.match(self.only)),
            "generate.only",
            f"{self.only!r} is not an image id",
            "give an image file's name from the folder, e.g. p0003-i0007",
        )
        _check_lora_file(self.lora)
        _check_model_config(self.model, self.model_config)
        _check_commit(self.model_commit, "generate.model_commit", "generate.model")
        _check_commit(self.lora_commit, "generate.lora_commit", "generate.lora")
        for key, repo in (("model", self.model), ("lora", self.lora)):
            _require(  # a pin of a folder would be silently ignored
                getattr(self, f"{key}_commit") is None or (repo is not None and looks_like_hub_id(repo)),
                f"generate.{key}_commit",
                f"pins a hub repo, but generate.{key} is {repo!r}",
                f"drop generate.{key}_commit, or set generate.{key} to a hub id (owner/name)",
            )
        _require(
            self.filter.min_clip is None or self.scores.clip,
            "generate.filter.min_clip",
            "needs CLIP scores, which are off",
            "also set generate.scores.clip=true",
        )
        _require(
            not self.filter.drop_near_duplicates or self.scores.phash,
            "generate.filter.drop_near_duplicates",
            "needs perceptual hashes, which are off",
            "also set generate.scores.phash=true",
        )


LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
"""The file name diffusers' ``save_lora_weights`` writes and ``load_lora_weights`` looks for in a folder."""


def is_hub_lora(lora: str | None) -> bool:
    """``generate.lora`` names a hub repo (``owner/name``); a name ending in ``.safetensors`` is a file."""
    return lora is not None and is_hub_id(lora) and not lora.endswith(".safetensors")


def _check_lora_file(lora: str | None) -> None:
    """``generate.lora`` names safetensors weights that exist (pickled LoRA files are never loaded); a hub
    repo is checked when launch stages it."""
    if lora is None or is_hub_lora(lora):
        return
    path = Path(lora).expanduser()
    weights = path / LORA_WEIGHTS if path.is_dir() else path
    _require(
        weights.is_file() and weights.suffix == ".safetensors",
        "generate.lora",
        f"{weights} is not a .safetensors file",
        f"give a folder holding {LORA_WEIGHTS} (a LoRA run's lora/ folder) or a .safetensors file",
    )


def _check_model_config(model: str | None, model_config: str | None) -> None:
    """``generate.model_config`` goes with a single-file ``generate.model``, and is a pipeline folder."""
    if model_config is None:
        return
    _require(
        model is not None and is_single_file(model),
        "generate.model_config",
        f"describes a single-file checkpoint, but generate.model is {model!r}",
        "drop generate.model_config, or set generate.model to a .safetensors checkpoint file",
    )
    _require(
        (Path(model_config).expanduser() / "model_index.json").is_file(),
        "generate.model_config",
        f"{model_config} is not a diffusers pipeline folder (no model_index.json)",
        "give the folder of a pipeline of the checkpoint's family (saved by save_pretrained, or a staged "
        "hub model), or drop it to use model.path's",
    )
