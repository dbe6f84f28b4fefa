"""Stage a hub dataset on the login node, as :mod:`sdcluster.models.hub` stages a model.

``data=hub data.name=owner/name``: launch resolves ``data.revision`` to a commit, checks access, the split
and free space, downloads once only the split's files (huggingface_hub's own cache and progress bars), loads
them with ``datasets`` and writes them out as an imagefolder (images + ``metadata.jsonl``,
:mod:`sdcluster.data.hub_folder`). ``data.path`` is then that folder, so validate, the holdout, the latent
cache and ``data.max_samples`` run the one code path a local folder runs, and jobs read it with the hub off.

Which files a split reads is decided by ``datasets`` itself (its dataset card's ``configs:`` or its default
split patterns, the same a ``load_dataset(owner/name)`` would use), run on the repo's file listing: the
listing is laid out as empty files in a scratch folder and handed to ``datasets``' local module factory, so
nothing is downloaded to find out. One function of one spec (:func:`stage_dataset`), so several sources
stage alike.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from sdcluster import atomic
from sdcluster.config import Config, ConfigError, DataConfig
from sdcluster.identity import stable_hash

Say = Callable[[str], None]


@dataclass(frozen=True)
class HubDataSpec:
    """One hub dataset to stage; ``key`` is the config key errors name (``data``, later one source's)."""

    name: str
    revision: str = "main"
    commit: str | None = None
    split: str = "train"
    image_column: str = "image"
    caption_column: str = "text"
    cache_dir: str | None = None
    key: str = "data"

    @classmethod
    def of(cls, data: DataConfig) -> HubDataSpec:
        return cls(
            data.name,
            data.revision,
            data.commit,
            data.split,
            data.image_column,
            data.caption_column,
            data.cache_dir,
        )


@dataclass(frozen=True)
class StagedDataset:
    """A hub dataset resolved to a commit: the split's repo files and the imagefolder jobs read."""

    repo_id: str
    revision: str
    commit: str
    split: str
    files: tuple[str, ...]
    folder: Path  # the staged imagefolder (data.path); complete when it exists
    missing_bytes: int
    offline: bool


def _card_name() -> str:
    """The dataset card's file name in a repo (huggingface_hub's constant)."""
    from huggingface_hub import constants

    return constants.REPOCARD_NAME


def cache_dir(spec: HubDataSpec) -> Path:
    """``data.cache_dir``, or Hugging Face's hub cache (``HF_HUB_CACHE``)."""
    if spec.cache_dir:
        return Path(spec.cache_dir).expanduser().absolute()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def staged_folder(spec: HubDataSpec, commit: str) -> Path:
    """Where the imagefolder of ``spec`` at ``commit`` is written: beside huggingface_hub's own folders (it
    does not own it), one per split and columns, since each makes other images and captions."""
    what = stable_hash([spec.split, spec.image_column, spec.caption_column])
    return cache_dir(spec) / "sdcluster-datasets" / spec.name.replace("/", "--") / commit / what


def origin(data: DataConfig) -> dict[str, object]:
    """What a run was trained on, for job.json: the hub id, revision asked, commit, split and columns."""
    keys = ("name", "revision", "commit", "split", "image_column", "caption_column", "path")
    return {key: getattr(data, key) for key in keys}


def _explain(err: Exception, spec: HubDataSpec, revision: str) -> ConfigError:
    """The ConfigError (cause and fix) for an error the hub answered with."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    key, page = spec.key, f"{constants.ENDPOINT}/datasets/{spec.name}"
    if isinstance(err, GatedRepoError):
        token = (
            "no token was sent" if err.response.status_code == 401 else "your token's account has no access"
        )
        return ConfigError(
            f"{key}.name: the dataset {spec.name} is gated and {token}. Fix: accept its conditions on "
            f"{page}, then `hf auth login` or export HF_TOKEN in this shell (jobs do not need it: they "
            "read the staged copy)"
        )
    if isinstance(err, RevisionNotFoundError):
        which = f"{key}.commit" if revision == spec.commit else f"{key}.revision"
        return ConfigError(
            f"{which}: {revision!r} is not a branch, tag or commit of the dataset {spec.name}. Fix: use one "
            f"listed on {page}, or drop {which} (main)"
        )
    if isinstance(err, RepositoryNotFoundError):
        return ConfigError(
            f"{key}.name: {spec.name!r} is not a dataset on the hub ({constants.ENDPOINT}), or it is private "
            "and your token cannot see it. Fix: check the id (owner/name, as in huggingface.co/datasets/"
            "owner/name), or export HF_TOKEN with read access"
        )
    return ConfigError(
        f"{key}.name: the hub refused {spec.name} ({err}). Fix: check HF_TOKEN and HF_ENDPOINT"
    )


def _not_cached(spec: HubDataSpec, revision: str, reason: str) -> ConfigError:
    return ConfigError(
        f"{spec.key}.name: the hub cannot be reached ({reason}) and the dataset {spec.name} at {revision!r} "
        f"is not staged in {cache_dir(spec)}. Fix: launch once where the hub is reachable (with the same "
        f"{spec.key}.cache_dir), or check the network (HF_ENDPOINT, proxy)"
    )


def _listing(spec: HubDataSpec, revision: str) -> tuple[str, dict[str, int], bool] | str:
    """(commit, size of every file, offline) from the hub, else from the cache; why not, when neither
    answers."""
    import httpx2
    from huggingface_hub import HfApi, get_cached_repo_tree
    from huggingface_hub.errors import (
        CachedRepoTreeNotFoundError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RevisionResolutionError,
    )

    api, cache = HfApi(), cache_dir(spec)
    try:
        commit = api.resolve_revision(spec.name, repo_type="dataset", revision=revision, cache_dir=cache)
        info = api.dataset_info(spec.name, revision=commit.resolved, files_metadata=True)
        return commit.resolved, {s.rfilename: s.size or 0 for s in info.siblings or []}, False
    except OfflineModeIsEnabled:
        reason = "HF_HUB_OFFLINE=1"
    except (httpx2.TransportError, RevisionResolutionError) as err:
        reason = f"{type(err).__name__}: {err}"
    except HfHubHTTPError as err:
        if err.response is None or err.response.status_code < 500:
            raise _explain(err, spec, revision) from None
        reason = f"the hub answered {err.response.status_code}"
    try:  # the ref and listing snapshot_download stored: enough for a dataset staged before
        commit = api.resolve_revision(
            spec.name, repo_type="dataset", revision=revision, cache_dir=cache, local_files_only=True
        )
        tree = get_cached_repo_tree(spec.name, repo_type="dataset", revision=commit.resolved, cache_dir=cache)
    except (RevisionResolutionError, CachedRepoTreeNotFoundError):
        return reason
    return commit.resolved, {f.path: f.size or 0 for f in tree}, True


def split_files(spec: HubDataSpec, repo_files: list[str], readme: Path | None) -> tuple[str, list[str]]:
    """(``datasets`` builder name, repo files of ``spec.split``) as ``datasets`` resolves them for the repo:
    its own patterns run on the listing laid out as empty files (with the real card for ``configs:``)."""
    from datasets.load import LocalDatasetModuleFactory

    with tempfile.TemporaryDirectory(prefix="sdcluster-listing-") as scratch:
        root = Path(scratch)
        for name in repo_files:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).touch()
        if readme is not None:
            shutil.copyfile(readme, root / _card_name())
        try:
            module = LocalDatasetModuleFactory(str(root)).get_module()
        except Exception as err:  # datasets says why it cannot read the repo (no data files, mixed formats)
            raise ConfigError(
                f"{spec.key}.name: datasets cannot load {spec.name} ({err}). Fix: pick a dataset of parquet "
                "files with an Image column, or an imagefolder repo (images + metadata.jsonl)"
            ) from None
        configs = module.builder_configs_parameters.builder_configs or []
        default = module.builder_configs_parameters.default_config_name
        config = next((c for c in configs if c.name == default), configs[0] if configs else None)
        if config is not None:  # a dataset card's configs: are patterns until resolved, as the builder does
            from datasets import DownloadConfig

            config._resolve_data_files(str(root), DownloadConfig())
        splits = {str(k): v for k, v in (config.data_files or {}).items()} if config else {}
        if spec.split not in splits:
            raise ConfigError(
                f"{spec.key}.split: {spec.name} has no split {spec.split!r}; its splits: "
                f"{', '.join(sorted(splits)) or 'none'}. Fix: {spec.key}.split=<one of them>"
            )
        files = sorted(Path(f).relative_to(root.resolve()).as_posix() for f in splits[spec.split])
    return module.module_path.rsplit(".", 1)[-1], files


def _check_space(spec: HubDataSpec, needed: int, commit: str) -> None:
    where = cache_dir(spec)
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed > free:
        raise ConfigError(
            f"{spec.key}.cache_dir: {cache_dir(spec)} has {free / 2**30:.2f} GiB free, but the dataset "
            f"{spec.name} at {commit[:12]} needs about {needed / 2**30:.2f} GiB more (its files, and the "
            f"staged images). Fix: free space there, or set {spec.key}.cache_dir to shared storage with room"
        )


def stage_dataset(spec: HubDataSpec, download: bool = True, say: Say | None = None) -> StagedDataset:
    """Resolve ``spec`` to a commit, check its split and, with ``download``, stage its imagefolder.

    Pinned to ``spec.commit`` when set (a resumed run keeps its images), else to what ``spec.revision``
    points at now. Without the hub the cache answers alone, or a ConfigError says what to do.
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    from sdcluster.data.hub_folder import write_imagefolder

    revision = spec.commit or spec.revision or "main"
    listing = _listing(spec, revision)
    if isinstance(listing, str):
        raise _not_cached(spec, revision, listing)
    commit, sizes, offline = listing
    folder = staged_folder(spec, commit)
    cache = cache_dir(spec)
    readme = None
    if _card_name() in sizes:  # the dataset card: small, and its configs: may say which files make the split
        readme = Path(
            hf_hub_download(
                spec.name,
                _card_name(),
                repo_type="dataset",
                revision=commit,
                cache_dir=cache,
                local_files_only=offline,
            )
        )
    builder, files = split_files(spec, list(sizes), readme)
    size = 0 if folder.is_dir() else sum(sizes[f] for f in files)  # what is still to download
    if offline and not folder.is_dir():
        raise _not_cached(spec, revision, "HF_HUB_OFFLINE=1 or no network")
    if not download or folder.is_dir():
        return StagedDataset(spec.name, revision, commit, spec.split, tuple(files), folder, size, offline)
    # the files, then the images written out of them (about as many bytes again: they are not re-encoded)
    _check_space(spec, 2 * size, commit)
    if say:
        say(
            f"{spec.key}: downloading {len(files)} files ({size / 2**20:.1f} MiB) of {spec.name} into {cache}"
        )
    try:
        snapshot = snapshot_download(
            spec.name, repo_type="dataset", revision=commit, cache_dir=cache, allow_patterns=files
        )
        write_imagefolder(spec, builder, [Path(snapshot) / f for f in files], folder, say)
    except Exception as err:
        if atomic.is_disk_full(err):
            raise ConfigError(
                f"{spec.key}.cache_dir: {cache} ran out of space while staging {spec.name} ({err}). Fix: "
                f"free space there, or set {spec.key}.cache_dir to larger shared storage"
            ) from None
        raise
    return StagedDataset(spec.name, revision, commit, spec.split, tuple(files), folder, size, offline)


def stage_data_for_launch(cfg: Config, dry_run: bool = False, say: Say = print) -> Config:
    """``cfg`` with a hub ``data`` pinned (``data.commit``) and ``data.path`` set to its staged folder (a
    dry run resolves and checks the split, downloading nothing); ``cfg`` itself is left as it was."""
    if not cfg.data.hub:
        return cfg
    # a dry run downloads nothing, unless train.epochs needs the images counted: they name the run folder
    download = not dry_run or cfg.train.epochs is not None
    staged = stage_dataset(HubDataSpec.of(cfg.data), download=download, say=say)
    where = "staged" if staged.folder.is_dir() else "not staged (dry run)"
    say(
        f"data: {staged.repo_id} {staged.revision} -> commit {staged.commit}, split {staged.split} "
        f"({where}): {staged.folder}"
    )
    return replace(cfg, data=replace(cfg.data, commit=staged.commit, path=str(staged.folder)))
