"""Identity: which settings name a run folder, a generation folder and a latent-cache entry.

The one module that decides what goes into a hash (:mod:`sdcluster.paths` only joins the folder names from
the hashes made here). Which keys are left out is part of the schema (the ``NOT_IDENTITY`` lists of
``TrainConfig``, ``LoraConfig``, ``DataConfig`` and ``GenerateConfig``, ``OptimConfig.STEPS_FREE_SCHEDULES``);
this module is their only reader.

Every hash made here is on disk already (run folders, checkpoints' ``config_hash``, ``generated/<hash>/``,
``latents/<key>/``): a key added to or dropped from one of these dicts moves existing runs to a new folder, so
fields added since the first runs are left out while unset (see :func:`model_identity`). The literal values
are pinned by ``tests/config/test_identity_pins.py``. Sits just above config, like paths (it reads the
config's schema classes, never imports them at run time: nothing of sdcluster is loaded by importing it).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # annotations only: paths imports this module, and paths sits below config's __init__
    from sdcluster.config import Config, GenerateConfig, ModelConfig


def stable_hash(obj: object, length: int = 8) -> str:
    """A short hash of a JSON-able object, stable across processes and machines."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def model_identity(model: ModelConfig) -> dict[str, Any]:
    """The part of the run's identity that comes from the model: the commit replaces a branch or tag name,
    so ``main`` moving on the hub starts a new run instead of mixing weights; where the cache lives does not
    change what is learned."""
    fields = dataclasses.asdict(model)
    fields.pop("cache_dir")
    fields.pop("native_resolution")  # describes the model; train.resolution is what is learned
    for key in ("vae_path", "vae_commit"):  # absent from runs made before they existed: folders stay
        if fields[key] is None:
            fields.pop(key)
    if model.flow_matching == type(model.flow_matching)():  # at its defaults: run folders stay
        fields.pop("flow_matching")
    commit = fields.pop("commit")
    if commit:
        fields["revision"] = commit
    return fields


def semantic_train_config(cfg: Config) -> dict[str, Any]:
    """The part of the config that defines a training run (its identity).

    Which keys are left out is part of the schema: ``TrainConfig.NOT_IDENTITY``, ``DataConfig.NOT_IDENTITY``,
    and ``train.max_steps`` with a schedule in ``OptimConfig.STEPS_FREE_SCHEDULES``.
    """
    train = dataclasses.asdict(cfg.train)
    for key in cfg.train.NOT_IDENTITY:
        train.pop(key)
    for key in cfg.train.IDENTITY_WHEN_SET:  # at their default: the hash of runs from before they existed
        if train[key] == getattr(type(cfg.train), key):
            train.pop(key)
    if not cfg.train.trains_adapters:  # full runs keep the folder names they had before LoRA
        train.pop("method")
        train.pop("lora")
    else:
        for key in cfg.train.lora.NOT_IDENTITY:
            train["lora"].pop(key)
    if cfg.optim.lr_schedule in cfg.optim.STEPS_FREE_SCHEDULES:
        train.pop("max_steps")
    data = dataclasses.asdict(cfg.data)
    for key in cfg.data.NOT_IDENTITY:
        data.pop(key)
    for key in cfg.data.IDENTITY_WHEN_SET:  # at their default: the hash of runs from before they existed
        if data[key] == getattr(type(cfg.data), key):
            data.pop(key)
    if not cfg.data.buckets.enabled:  # off, as every run before buckets existed: those folders stay
        data.pop("buckets")
    sources = data.pop("sources")  # empty, as every run before sources existed: those folders stay
    data_source_identity(data, cfg.data.HUB_ONLY)
    if sources:
        data.pop("path", None)  # not read with sources (data=sources leaves it empty)
        data["sources"] = [source_identity(source, cfg.data.HUB_ONLY) for source in sources]
    return {
        "model": model_identity(cfg.model),  # a hub branch counts as the commit it resolved to
        "data": data,
        "optim": dataclasses.asdict(cfg.optim),
        "train": train,
    }


def data_source_identity(data: dict[str, Any], hub_only: tuple[str, ...]) -> None:
    """Edit one data source's identity (``asdict`` of ``DataConfig``) in place: a folder keeps the hash it
    had before hub datasets (their keys dropped); a hub dataset is its id, split, columns and commit (the
    commit replaces a branch, as for models), not the staged folder's path, which says where the cache is."""
    if not data.get("hub"):
        for key in hub_only:
            data.pop(key, None)
        return
    data.pop("path")
    commit = data.pop("commit")
    if commit:
        data["revision"] = commit


SOURCE_METADATA = "metadata.jsonl"  # sdcluster.data.reader.METADATA_FILE: identity sits below the data wing


@functools.cache
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    """sha256 of one file, read once per version of it (the stat keys the cache)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_contents(folder: str) -> str | None:
    """A folder source's contents identity: the sha256 of its ``metadata.jsonl`` (which images, with which
    captions); None when it cannot be read (launch refuses such a source before this names a run). An image
    replaced under its old name keeps the run, as with data.path; the latent cache key hashes pixels."""
    meta = Path(folder) / SOURCE_METADATA
    try:
        stat = meta.stat()
        return _file_digest(str(meta), stat.st_mtime_ns, stat.st_size)
    except OSError:
        return None


def source_identity(source: dict[str, Any], hub_only: tuple[str, ...]) -> dict[str, Any]:
    """One ``data.sources`` entry (``asdict`` of ``SourceConfig``) in the run's identity: a folder is its
    contents (:func:`folder_contents`, not its path: a moved or copied folder is the same data), a hub
    dataset its id, split, columns and commit; with each, its caption column, repeats and holdout (when
    set). The list keeps its order: rows are numbered source by source, so another order is another run."""
    source = dict(source)
    if source["holdout"] is None:
        source.pop("holdout")
    if not source["hub"]:
        source["contents"] = folder_contents(source["path"])
        source.pop("path")
        source.pop("name")  # a label
    data_source_identity(source, hub_only)
    return source


def config_hash(cfg: Config) -> str:
    """The run's identity as recorded in every checkpoint (the run folder name uses its first 8 digits)."""
    return stable_hash(semantic_train_config(cfg), length=16)


def run_hash(cfg: Config) -> str:
    """The hash in the run folder's name: the same command always maps to the same folder."""
    return stable_hash(semantic_train_config(cfg))


def generation_hash(cfg: Config, model: Path | str, lora: Path | None) -> str:
    """The hash naming one generation setting's folder: settings that change pixels change it, batch size
    not. ``model`` and ``lora`` are the resolved ones (``paths.generation_model`` / ``generation_lora``)."""
    gen = dataclasses.asdict(cfg.generate)
    for key in cfg.generate.NOT_IDENTITY:  # batch size, shards, scores, filter: not the pixels
        gen.pop(key)
    identity: dict[str, Any] = {"generate": gen, "model": str(model)}
    gen.pop("lora")  # the resolved path instead; none: folders made before LoRA keep their names
    # a hub model's or LoRA's pin, a single file's config folder; unset: folders keep their names
    for key in ("model_commit", "lora_commit", "model_config"):
        if gen[key] is None:
            gen.pop(key)
    if lora is None:
        gen.pop("lora_scale")
    else:
        identity["lora"] = str(lora)
    if not cfg.generate.model:  # the run's export changes when training continues to more steps
        identity["train_steps"] = cfg.train.max_steps
    prompts = cfg.generate.prompts_file
    if prompts and Path(prompts).is_file():  # its lines, not only its path: an edited file is other images
        identity["prompts"] = hashlib.sha256(Path(prompts).read_bytes()).hexdigest()
    return stable_hash(identity)


SETTINGS_LEFT_OUT = ("batch_size", "shards", "max_images")
"""Generate keys a folder's ``settings.json`` does not record: how the work is cut, not what is made. The
other ``NOT_IDENTITY`` keys (scores, filter, split) are recorded: the merge reads the split from there."""


def not_remade(gen: GenerateConfig) -> tuple[str, ...]:
    """Generate keys a remake command leaves out: they do not change the image (the folder does not hash
    them either), or the command sets them itself (model, lora: resolved; only: the image)."""
    return (*gen.NOT_IDENTITY, "model", "lora", "only")


def generation_settings(cfg: Config) -> dict[str, Any]:
    """What a generation folder's ``settings.json`` records of ``generate`` (the job adds the resolved
    model, LoRA and prompts, and compares the prompts to decide that the folder's images can be kept)."""
    settings = dataclasses.asdict(cfg.generate)
    for key in SETTINGS_LEFT_OUT:
        settings.pop(key)
    return settings


class Prompts(Protocol):
    """A generation's prompts, counted and made one at a time (``generate.plan.Plan``)."""

    @property
    def prompt_count(self) -> int: ...

    def prompt_texts(self) -> Iterator[str]: ...


LISTED_PROMPTS = 10_000
"""Up to this many prompts ``settings.json`` lists them (readable); above, their count and a digest."""


def prompts_identity(plan: Prompts) -> dict[str, Any]:
    """What ``settings.json`` keeps of the prompts, made one prompt at a time (a plan is never listed)."""
    if plan.prompt_count <= LISTED_PROMPTS:
        return {"resolved_prompts": list(plan.prompt_texts())}
    digest = hashlib.sha256()
    for text in plan.prompt_texts():
        digest.update(json.dumps(text).encode() + b"\n")
    return {"resolved_prompts_count": plan.prompt_count, "resolved_prompts_sha256": digest.hexdigest()}


def same_prompts(written: dict[str, Any], plan: Prompts, identity: dict[str, Any]) -> bool:
    """Whether a folder's ``settings.json`` (``written``) was made from this plan's prompts: if not, its
    images (``p0003`` meaning another prompt) cannot be kept."""
    old = written.get("resolved_prompts")
    if old is not None:  # as folders have always had it: compared one prompt at a time
        return len(old) == plan.prompt_count and all(
            a == b for a, b in zip(old, plan.prompt_texts(), strict=True)
        )
    if "resolved_prompts_sha256" in written:
        return written["resolved_prompts_sha256"] == identity.get("resolved_prompts_sha256")
    return True


def latent_cache_key(
    cfg: Config,
    *,
    version: int,
    family: str,
    source: str,
    files: dict[str, list[int]],
    vae_files: dict[str, list[int]] | None,
    dtypes: list[str],
    images: list[list[str]],
    empty_caption: bool = False,
    buckets: dict[str, Any] | None = None,
) -> str:
    """The key of a latent-cache entry: everything its numbers depend on.

    The config part is decided here (the model's source, revision and variant, another VAE, the resolution
    and crop/flip policy); what only the job can see comes in: the entry format ``version``, the model's
    ``family`` name, the resolved ``source`` folder or hub id, the (size, mtime) of the encoder ``files``
    and of ``model.vae_path``'s (``models.load.model_files`` / ``vae_files``), the encoders' ``dtypes``,
    and each training image's sha256 and caption in row order; ``empty_caption``: the entry also holds the
    empty caption's encodings (``data.caption_dropout``), named only when set so other keys stay as they
    were; ``buckets``: the aspect-ratio bucket settings (``data.buckets``, with the resolved side), when on.
    """
    model = {"source": source, "revision": cfg.model.revision, "variant": cfg.model.variant, "files": files}
    if cfg.model.vae_path:  # another VAE encodes the images: other latents
        model["vae"] = {"path": cfg.model.vae_path, "files": vae_files or {}}
    identity = {
        "version": version,
        "family": family,
        "model": model,
        "dtypes": dtypes,
        "resolution": cfg.train.resolution,
        "center_crop": cfg.train.center_crop,
        "random_flip": cfg.train.random_flip,
        "images": images,
    }
    if empty_caption:
        identity["empty_caption"] = True
    if buckets is not None:  # each image is stored at its bucket's size: other rows
        identity["buckets"] = buckets
    return stable_hash(identity, 24)
