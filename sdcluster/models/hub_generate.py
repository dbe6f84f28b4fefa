"""Stage what a generation job loads besides the run's own model: ``generate.model``, ``generate.lora`` and
the CLIP scorer (``generate.scores.clip_model``), when they are hub ids.

Each goes the way the base model goes (:mod:`sdcluster.models.hub`): on the login node, before anything is
queued, resolved to a commit, its files checked (safetensors only) and downloaded once into the model cache
(``model.cache_dir``); the returned config is pinned (``generate.model_commit``, ``generate.lora_commit``,
``generate.scores.clip_commit``), so every shard of the job reads exactly those files with the hub off. An
unpinned CLIP scorer used to be fetched inside the job: an offline node failed, an online one downloaded a
copy per shard.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from sdcluster.config import Config, ModelConfig
from sdcluster.config.generate import is_hub_lora
from sdcluster.model_source import is_hub_id
from sdcluster.models.hub import CLIP, LORA, PIPELINE, Say, StagedModel, said, stage_as

# where a staged file is missing from the cache: the fetch command stages base models only, a launch all
_FIX = "launch again there (a launch stages every hub model its jobs load)"


def generate_model(cfg: Config) -> ModelConfig:
    """A hub ``generate.model`` as a model of its own, in the run's model cache, pinned to its commit."""
    path, commit = str(cfg.generate.model), cfg.generate.model_commit
    return ModelConfig(name="generate", path=path, cache_dir=cfg.model.cache_dir, commit=commit)


def lora_model(cfg: Config) -> ModelConfig:
    """A hub ``generate.lora`` as a repo of its own, in the run's model cache, pinned to its commit."""
    path, commit = str(cfg.generate.lora), cfg.generate.lora_commit
    return ModelConfig(name="lora", path=path, cache_dir=cfg.model.cache_dir, commit=commit)


def clip_model(cfg: Config) -> ModelConfig:
    """A hub CLIP scorer as a repo of its own, in the run's model cache, pinned to its commit."""
    scores = cfg.generate.scores
    return ModelConfig(
        name="clip", path=scores.clip_model, cache_dir=cfg.model.cache_dir, commit=scores.clip_commit
    )


_COMMIT_KEYS = {
    "generate.model": "generate.model_commit",
    "generate.lora": "generate.lora_commit",
    "generate.scores.clip_model": "generate.scores.clip_commit",
}


def _stage(model: ModelConfig, key: str, kind: str, download: bool, say: Say | None) -> StagedModel:
    return stage_as(model, key, _COMMIT_KEYS[key], kind, download, say, fetch_fix=_FIX)


def staged_generate_folder(cfg: Config) -> Path:
    """The pinned snapshot of a hub ``generate.model``, from the cache only (what the job loads)."""
    return _stage(generate_model(cfg), "generate.model", PIPELINE, False, None).folder


def staged_lora_file(cfg: Config) -> Path:
    """The pinned LoRA weights file of a hub ``generate.lora``, from the cache only (what the job loads)."""
    staged = _stage(lora_model(cfg), "generate.lora", LORA, False, None)
    return staged.folder / staged.files[0]


def pin_generation(cfg: Config, dry_run: bool = False, say: Say = print) -> Config:
    """``cfg`` with every hub model its generation loads staged and pinned; ``cfg`` itself is unchanged.

    A dry run resolves and checks them and downloads nothing. A training-only launch stages none of them.
    The CLIP scorer's pin also points ``clip_model`` at the staged folder (not in a dry run: none is
    downloaded): scores do not name the images' folder, and the scorer then needs neither the hub nor the
    model cache's location.
    """
    gen = cfg.generate
    if not cfg.generates:
        return cfg
    download = not dry_run
    if gen.model and is_hub_id(gen.model):
        staged = _stage(generate_model(cfg), "generate.model", PIPELINE, download, say)
        gen = replace(gen, model_commit=staged.commit)
        said(say, "generate.model", staged)
    if is_hub_lora(gen.lora):
        staged = _stage(lora_model(cfg), "generate.lora", LORA, download, say)
        gen = replace(gen, lora_commit=staged.commit)
        said(say, "generate.lora", staged)
    if gen.scores.clip and is_hub_id(gen.scores.clip_model):
        staged = _stage(clip_model(cfg), "generate.scores.clip_model", CLIP, download, say)
        folder = str(staged.folder) if download else gen.scores.clip_model  # a dry run fetches no folder
        scores = replace(gen.scores, clip_model=folder, clip_commit=staged.commit)
        gen = replace(gen, scores=scores)
        said(say, "generate.scores.clip_model", staged)
    return cfg if gen is cfg.generate else replace(cfg, generate=gen)
