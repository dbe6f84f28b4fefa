"""Stage a hub model on the login node, so that jobs read it from a cache with the hub switched off.

A compute node often has no internet, a gated model needs a token that must not travel with the job, and a
typo, a bad revision or a full quota should not wait six hours in a queue to show. So ``launch`` (through
:func:`stage_for_launch`) resolves the revision to a commit, checks access and free space, downloads once
only the files the pipeline loads, and returns the config pinned to that commit (``model.commit``); every
rank then loads the same files from ``model.cache_dir`` with ``HF_HUB_OFFLINE=1`` (:func:`staged_folder`).

The cache is huggingface_hub's own (``models--org--name/snapshots/<commit>``), written by
``snapshot_download``: several launches share it and a second one downloads nothing.

    python -m sdcluster.models fetch CompVis/stable-diffusion-v1-4     # stage ahead of time (see __main__)
"""

from __future__ import annotations

import glob
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sdcluster import atomic
from sdcluster.config import Config, ConfigError, ModelConfig
from sdcluster.model_source import is_hub_id, is_single_file
from sdcluster.models.hub_files import (  # re-exported: the staging's file choices, one module below
    CONFIG_FILE,
    INDEX_FILE,
    select_clip_files,
    select_component_files,
    select_files,
    select_lora_files,
)

Say = Callable[[str], None]


@dataclass(frozen=True)
class StagedModel:
    """A hub model resolved to a commit, with the files jobs load and where they are (or will be)."""

    repo_id: str
    revision: str  # what was asked for: a branch, a tag or a commit
    commit: str
    files: tuple[str, ...]
    folder: Path  # the snapshot folder of ``commit`` in the cache
    missing_bytes: int  # what still had to be downloaded when staging began
    offline: bool  # the hub could not be reached: everything came from the cache


def cache_dir(model: ModelConfig) -> Path:
    """``model.cache_dir``, or Hugging Face's cache (``HF_HUB_CACHE``) when it is not set."""
    if model.cache_dir:
        return Path(model.cache_dir).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def origin(model: ModelConfig) -> dict[str, Any]:
    """What a run was trained from, for job.json and the export: the hub id, revision asked, commit loaded."""
    return {"path": model.path, "revision": model.revision, "commit": model.commit, "variant": model.variant}


def _explain(err: Exception, model: ModelConfig, revision: str) -> ConfigError:
    """The ConfigError (cause and fix) for an error the hub answered with."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    repo, page = model.path, f"{constants.ENDPOINT}/{model.path}"
    if isinstance(err, GatedRepoError) and err.response.status_code == 401:
        return ConfigError(
            f"model.path: {repo} is gated and no token was sent. Fix: accept its license on {page}, then "
            "run `hf auth login` or export HF_TOKEN in this shell (jobs do not need it: they read the "
            "staged copy)"
        )
    if isinstance(err, GatedRepoError):
        return ConfigError(
            f"model.path: {repo} is gated and the account of your token has no access yet. Fix: accept "
            f"the license on {page} logged in as that account (or use a token of an account that did), "
            "then launch again"
        )
    if isinstance(err, RepositoryNotFoundError):
        return ConfigError(
            f"model.path: {repo!r} is not a model on the hub ({constants.ENDPOINT}), or it is private and "
            "your token cannot see it. Fix: check the id (e.g. CompVis/stable-diffusion-v1-4, or "
            "model=sd14), or export HF_TOKEN with read access"
        )
    if isinstance(err, RevisionNotFoundError):
        key = "model.commit" if revision == model.commit else "model.revision"
        return ConfigError(
            f"{key}: {revision!r} is not a branch, tag or commit of {repo}. Fix: use one listed on "
            f"{page}, or drop {key} (main)"
        )
    return ConfigError(f"model.path: the hub refused {repo} ({err}). Fix: check HF_TOKEN and HF_ENDPOINT")


def _not_cached(model: ModelConfig, revision: str, reason: str) -> ConfigError:
    return ConfigError(
        f"model.path: the hub cannot be reached ({reason}) and {model.path} at {revision!r} is not "
        f"complete in the model cache {cache_dir(model)}. Fix: stage it where the hub is reachable, with "
        f"the same model.cache_dir: python -m sdcluster.models fetch {model.path}"
        + (f" model.revision={revision}" if revision != "main" else "")
        + "; or check the network (HF_ENDPOINT, proxy)"
    )


def _remote_listing(model: ModelConfig, revision: str) -> tuple[str, dict[str, int]] | str:
    """(commit, size of every file) from the hub; why not, when the hub cannot be reached."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RevisionResolutionError

    api = HfApi()
    try:
        # resolve_revision also records revision -> commit in the cache (refs/), for a later offline launch
        commit = api.resolve_revision(model.path, revision=revision, cache_dir=cache_dir(model)).resolved
        info = api.model_info(model.path, revision=commit, files_metadata=True)
    except OfflineModeIsEnabled:
        return "HF_HUB_OFFLINE=1"
    except (httpx2.TransportError, RevisionResolutionError) as err:
        return f"{type(err).__name__}: {err}"
    except HfHubHTTPError as err:
        if err.response is not None and err.response.status_code >= 500:
            return f"the hub answered {err.response.status_code}"  # down: the cache may still hold the model
        raise _explain(err, model, revision) from None
    return commit, {s.rfilename: s.size or 0 for s in info.siblings or []}


def _cached_listing(model: ModelConfig, revision: str, reason: str) -> tuple[str, dict[str, int]]:
    """(commit, sizes) from the cache alone: the ref and file listing snapshot_download stored."""
    from huggingface_hub import HfApi, get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError, RevisionResolutionError

    try:
        commit = (
            HfApi()
            .resolve_revision(
                model.path, revision=revision, cache_dir=cache_dir(model), local_files_only=True
            )
            .resolved
        )
        tree = get_cached_repo_tree(model.path, revision=commit, cache_dir=cache_dir(model))
    except (RevisionResolutionError, CachedRepoTreeNotFoundError):
        raise _not_cached(model, revision, reason) from None
    return commit, {f.path: f.size or 0 for f in tree}


def _check_space(model: ModelConfig, needed: int, count: int, commit: str) -> None:
    where = cache_dir(model)
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed > free:
        raise ConfigError(
            f"model.cache_dir: {cache_dir(model)} has {free / 2**30:.2f} GiB free, but {model.path} at "
            f"{commit[:12]} needs {needed / 2**30:.2f} GiB more ({count} files). Fix: free space there, or "
            "set model.cache_dir to shared storage with room (every node must read it)"
        )


PIPELINE, COMPONENT, LORA, CLIP = "pipeline", "component", "lora", "clip"
"""What a repo holds: a diffusers pipeline, one diffusers model (a VAE), LoRA weights, a transformers CLIP."""
_FIRST = {PIPELINE: INDEX_FILE, COMPONENT: CONFIG_FILE, CLIP: CONFIG_FILE}  # the file that says what it is
_WHAT = {PIPELINE: "a diffusers pipeline", COMPONENT: "a single model (such as a VAE)", CLIP: "a CLIP model"}


def stage(
    model: ModelConfig, download: bool = True, say: Say | None = None, kind: str = PIPELINE
) -> StagedModel:
    """Resolve ``model`` (a hub id) to a commit and, with ``download``, make its files complete in the cache.

    Pinned to ``model.commit`` when set (a resumed or resubmitted run keeps its weights), else to what
    ``model.revision`` (default ``main``) points at now. Without the hub (no network, ``HF_HUB_OFFLINE=1``,
    the hub down) the cache answers alone, or a ConfigError says what to stage where. ``kind``: what the
    repo holds (:data:`PIPELINE`, :data:`COMPONENT`, :data:`LORA`, :data:`CLIP`), which says its files.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    revision = model.commit or model.revision or "main"
    listing = _remote_listing(model, revision)
    offline = isinstance(listing, str)
    if isinstance(listing, str):
        reason, (commit, sizes) = listing, _cached_listing(model, revision, listing)
    else:
        reason, (commit, sizes) = "the connection dropped", listing
    first = _FIRST.get(kind)
    if first is not None and first not in sizes:
        raise ConfigError(f"model.path: {model.path} has no {first}: not {_WHAT[kind]}. Fix: use one")
    cache = cache_dir(model)
    folder = _snapshot(cache, model.path, commit)
    try:
        files = _choose_files(model, kind, list(sizes), commit, offline)
        missing = [f for f in files if not (folder / f).is_file()]
        needed = sum(sizes[f] for f in missing)
        if not offline:
            _check_space(model, needed, len(missing), commit)
        if say and download and missing:
            say(
                f"model: downloading {len(missing)} files ({needed / 2**20:.1f} MiB) of {model.path} "
                f"into {cache}"
            )
        if download or offline:  # offline, this only checks that every file is there
            patterns = [glob.escape(f) for f in files]
            snapshot_download(
                model.path,
                revision=commit,
                cache_dir=cache,
                allow_patterns=patterns,
                local_files_only=offline,
            )
    except LocalEntryNotFoundError:
        raise _not_cached(model, revision, reason) from None
    except Exception as err:
        if atomic.is_disk_full(err):
            raise _explain_full(model, err) from None
        raise
    return StagedModel(model.path, revision, commit, tuple(files), folder, needed, offline)


def _snapshot(cache: Path, repo_id: str, commit: str) -> Path:
    """huggingface_hub's snapshot folder of ``commit`` in ``cache`` (where snapshot_download puts it)."""
    from huggingface_hub.file_download import repo_folder_name

    return cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / commit


def _choose_files(
    model: ModelConfig, kind: str, repo_files: list[str], commit: str, offline: bool
) -> list[str]:
    """The files of ``kind`` jobs load; a pipeline's are read from its ``model_index.json`` (fetched, also in
    a dry run: it is small and says which weights to size)."""
    from huggingface_hub import hf_hub_download

    if kind == COMPONENT:
        return select_component_files(repo_files, model.path)
    if kind == LORA:
        return select_lora_files(repo_files, model.path)
    if kind == CLIP:
        return select_clip_files(repo_files, model.path)
    index_path = hf_hub_download(
        model.path, INDEX_FILE, revision=commit, cache_dir=cache_dir(model), local_files_only=offline
    )
    index = json.loads(Path(index_path).read_text())
    return select_files(index, repo_files, model.variant, model.path)


def _explain_full(model: ModelConfig, err: Exception) -> ConfigError:
    return ConfigError(
        f"model.cache_dir: {cache_dir(model)} ran out of space (or quota) while downloading {model.path} "
        f"({err}). Fix: free space there, or set model.cache_dir to larger shared storage; the same command "
        "then downloads only what is missing"
    )


def staged_folder(model: ModelConfig) -> Path:
    """The complete snapshot folder of ``model.commit``, from the cache only: what every rank of a job
    loads (with ``HF_HUB_OFFLINE=1`` nothing reaches the hub, so ranks cannot race on a download)."""
    return stage(model, download=False).folder


def vae_model(model: ModelConfig) -> ModelConfig:
    """``model.vae_path`` (a hub id) as a model of its own, in the same cache, pinned to ``vae_commit``."""
    return ModelConfig(
        name="vae", path=str(model.vae_path), cache_dir=model.cache_dir, commit=model.vae_commit
    )


def stage_as(
    model: ModelConfig,
    key: str,
    commit_key: str,
    kind: str,
    download: bool = True,
    say: Say | None = None,
    fetch_fix: str | None = None,
) -> StagedModel:
    """Stage ``model`` (another key's hub id, as a model of its own) with errors that name that ``key`` and
    its ``commit_key``; ``fetch_fix``: the staging command the errors suggest (default: ``python -m
    sdcluster.models fetch`` with ``key``)."""
    try:
        return stage(model, download=download, say=say, kind=kind)
    except ConfigError as err:
        text = str(err).replace("model.path", key).replace("model.commit", commit_key)
        text = text.replace("model.revision", commit_key)
        fetch = f"python -m sdcluster.models fetch {model.path}"  # the fix names the key
        raise ConfigError(
            text.replace(fetch, fetch_fix or f"{fetch.rsplit(' ', 1)[0]} {key}={model.path}")
        ) from None


def stage_vae(model: ModelConfig, download: bool = True, say: Say | None = None) -> StagedModel:
    """Stage the VAE of ``model.vae_path`` like a model; errors name the VAE's keys."""
    return stage_as(vae_model(model), "model.vae_path", "model.vae_commit", COMPONENT, download, say)


def staged_vae_folder(model: ModelConfig) -> Path:
    """The staged VAE's snapshot folder, from the cache only (what jobs load with the hub off)."""
    return stage_vae(model, download=False).folder


def _generation_reads_base(cfg: Config) -> bool:
    """A generation job that loads the configured model itself (e.g. the base model of a LoRA run), or its
    configs (a single-file ``generate.model`` without ``generate.model_config``)."""
    from sdcluster.paths import generation_model

    model = str(generation_model(cfg))
    configs = is_single_file(model) and not cfg.generate.model_config
    return cfg.generates and (model == cfg.model.path or configs)


def _reads_hub_weights(cfg: Config) -> bool:
    """Training loads the model, and a generation-only job needs its commit to find the run it generates
    from (not when generate.model names the folder)."""
    return cfg.task != "generate" or not cfg.generate.model or _generation_reads_base(cfg)


def needs_staging(cfg: Config) -> bool:
    """Whether launching ``cfg`` reads a hub model (or a hub VAE in place of the model's)."""
    hub = is_hub_id(cfg.model.path) or (cfg.model.vae_path is not None and is_hub_id(cfg.model.vae_path))
    return hub and _reads_hub_weights(cfg)


def stage_for_launch(
    cfg: Config, dry_run: bool = False, say: Say = print
) -> tuple[Config, StagedModel | None]:
    """Login-node staging: the config pinned to the staged commits (``model.commit``, ``vae_commit`` for a
    hub VAE, and the hub models generation loads: see :func:`sdcluster.models.hub_generate.pin_generation`),
    and the staged model (None without a hub model). The run's identity and the jobs' weights follow the
    pins, so the returned config is the one to submit; ``cfg`` itself is left as it was (a sweep's points
    and a caller's copy keep what the user typed).

    A dry run, and a generation-only launch that reads an export, resolve and check but download nothing.
    """
    from sdcluster.models.hub_generate import pin_generation  # it stages through this module

    cfg, staged = _stage_model(cfg, dry_run, say)
    return pin_generation(cfg, dry_run, say), staged


def _stage_model(cfg: Config, dry_run: bool, say: Say) -> tuple[Config, StagedModel | None]:
    """``model.path`` and ``model.vae_path`` (hub ids), pinned."""
    if not needs_staging(cfg):
        return cfg, None
    download = not dry_run and (cfg.task != "generate" or _generation_reads_base(cfg))
    model, staged = cfg.model, None
    if is_hub_id(model.path):
        staged = stage(model, download=download, say=say)
        model = replace(model, commit=staged.commit)
        said(say, "model", staged)
    if model.vae_path and is_hub_id(model.vae_path):
        vae = stage_vae(model, download=download, say=say)
        model = replace(model, vae_commit=vae.commit)
        said(say, "model.vae_path", vae)
    return replace(cfg, model=model), staged


def said(say: Say, what: str, staged: StagedModel) -> None:
    """The line a launch prints for each staged repo: the key, what was asked, the commit and the folder."""
    where = "from the cache, hub unreachable" if staged.offline else "checked on the hub"
    say(f"{what}: {staged.repo_id} {staged.revision} -> commit {staged.commit} ({where}): {staged.folder}")
