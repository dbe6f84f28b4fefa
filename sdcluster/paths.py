"""Where every file goes. Other modules ask here instead of joining paths themselves.

Layout::

    outputs/runs/<name>-<hash>/          one training run, named by its semantic config (not time, not job id)
        checkpoints/step-00000020/       complete checkpoints only (see train/checkpointer.py)
        model/                           the exported diffusers pipeline
        generated/<hash>/                images + manifest.jsonl of one generation setting
        tensorboard/, metrics.jsonl, config.yaml
    outputs/generate/<hash>/             generation from a model that is not a run of ours
    outputs/sweeps/<id>/                 a sweep's ledger (sweep.json), report.csv, report.png
    jobs/<job_id>/                       one folder per scheduler job: logs, sbatch script, config, job.json
    ~/.sdcluster/jobs.tsv                the user's index of job folders ($SDCLUSTER_HOME)
    .cache/sdcluster/                    built tiny model (models/), latent caches (latents/), datasets' cache

Because the run folder is a hash of the settings that change what is learned, resubmitting the same command
finds the same folder and resumes; changing a hyperparameter starts a new run. The hashes come from
:mod:`sdcluster.identity`; this module only joins them into paths.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdcluster import identity
from sdcluster.model_source import is_hub_id, is_local

if TYPE_CHECKING:  # only for annotations: paths sits just above config and below everything else
    from sdcluster.config import Config

ASSETS = Path(__file__).resolve().parent / "assets"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "run"


def run_dir(cfg: Config) -> Path:
    """``outputs/runs/<name>-<hash>``: the same command always maps to the same folder."""
    name = _slug(cfg.run_name or cfg.model.name)
    return Path(cfg.output_root) / "runs" / f"{name}-{identity.run_hash(cfg)}"


@dataclass(frozen=True)
class RunPaths:
    """The files of one training run."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def lora(self) -> Path:
        """The exported adapters of a ``train.method=lora`` run (``pytorch_lora_weights.safetensors``)."""
        return self.root / "lora"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tracker(self) -> Path:
        """The W&B run id of this run folder (see :mod:`sdcluster.train.tracking`)."""
        return self.root / "tracker.json"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def validation(self) -> Path:
        return self.root / "validation"


def run_paths(cfg: Config) -> RunPaths:
    return RunPaths(run_dir(cfg))


def generation_model(cfg: Config) -> Path | str:
    """The model a generation job uses: ``generate.model``, the run's exported pipeline, or after a LoRA
    run the run's base model as configured (``model.path``: a folder, hub id or ``tiny``). A folder is a
    ``Path``; a model named by id (a hub ``generate.model``, or the base model) a ``str``."""
    if cfg.generate.model:
        return cfg.generate.model if is_hub_id(cfg.generate.model) else Path(cfg.generate.model)
    if cfg.train.trains_adapters:  # its adapters (generation_lora) go on the model it started from
        return cfg.model.path
    return run_paths(cfg).model


def generation_lora(cfg: Config) -> Path | None:
    """The LoRA put on the generation model: ``generate.lora``, else after a LoRA run its own export."""
    if cfg.generate.lora:
        return Path(cfg.generate.lora)
    if cfg.train.trains_adapters and not cfg.generate.model:
        return run_paths(cfg).lora
    return None


def generation_dir(cfg: Config) -> Path:
    """Images of one generation setting: settings that change pixels change the folder, batch size not
    (:func:`sdcluster.identity.generation_hash`)."""
    key = identity.generation_hash(cfg, generation_model(cfg), generation_lora(cfg))
    if cfg.generate.model:
        return Path(cfg.output_root) / "generate" / key
    return run_paths(cfg).root / "generated" / key


def job_dir(cfg: Config, job_id: str) -> Path:
    """``jobs/<job_id>``; array tasks (``123_4``) get their own folder."""
    return Path(cfg.jobs_root) / str(job_id)


def jobs_umask(cfg: Config) -> int:
    """The umask everything under ``jobs_root`` is created with, whatever the user's: writable by the owner
    only (the pickles and the sbatch script in it are loaded and run as the user, a rewritten one runs a
    stranger's code), readable by the group too with ``cluster.share_jobs_with_group`` (0750 / 0640)."""
    return 0o027 if cfg.cluster.share_jobs_with_group else 0o077


def private_jobs_root(cfg: Config) -> Path:
    """``jobs_root``, created if needed, with the mode of :func:`jobs_umask` (0700, or 0750 when shared)."""
    root = Path(cfg.jobs_root)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o777 & ~jobs_umask(cfg))
    return root


def job_log(folder: Path, job_id: str, task: int, err: bool = False) -> Path:
    """submitit's per-task log in a job folder: ``<job_id>_<task>_log.out`` (``.err`` for stderr)."""
    return Path(folder) / f"{job_id}_{task}_log.{'err' if err else 'out'}"


def job_index() -> Path:
    """Where the user's submissions are indexed (job id -> folder), so ``logs`` works from any directory."""
    return sdcluster_home() / "jobs.tsv"


def sdcluster_home() -> Path:
    return Path(os.environ.get("SDCLUSTER_HOME", Path.home() / ".sdcluster"))


def sweep_dir(output_root: Path | str, sweep_id: str) -> Path:
    """``outputs/sweeps/<id>``: one sweep's ledger, report and plot."""
    return Path(output_root) / "sweeps" / sweep_id


def submitit_folder(cfg: Config) -> Path:
    """submitit expands ``%j`` to the job id (``%A_%a`` for array tasks), giving ``jobs/<job_id>/``."""
    return Path(cfg.jobs_root) / "%j"


def datasets_cache(cfg: Config) -> Path:
    """Where ``datasets`` keeps its Arrow cache of the image folders (shared by every run)."""
    return Path(cfg.cache_root) / "datasets"


def data_snapshot_file(cache_root: Path | str, digest: str) -> Path:
    """``<cache_root>/data_snapshots/<digest>.json``: what a launch checked of the training data
    (``data/snapshot.py``), named by the sha256 of its bytes."""
    return Path(cache_root) / "data_snapshots" / f"{digest}.json"


def latent_cache_dir(cfg: Config) -> Path:
    """``<cache_root>/latents/<key>``: one folder per latent-cache entry (see ``data/latent_cache.py``)."""
    return Path(cfg.cache_root) / "latents"


def tiny_model_dir(cache_root: Path | str, name: str = "tiny") -> Path:
    return Path(cache_root) / "models" / name


def sample_data_dir() -> Path:
    return ASSETS / "sample_data"


def absolutize(cfg: Config, base: Path | None = None) -> Config:
    """Make every path in the config absolute, so a job runs the same from any working directory."""
    base = base or Path.cwd()

    def absolute(value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    cfg.output_root = absolute(cfg.output_root)
    cfg.jobs_root = absolute(cfg.jobs_root)
    cfg.cache_root = absolute(cfg.cache_root)
    # empty: no folder (data=sources, whose sources name theirs; a hub dataset before staging), not this one
    cfg.data.path = absolute(cfg.data.path) if cfg.data.path else cfg.data.path
    for source in cfg.data.sources:  # a hub source's path is set by launch, to an absolute folder
        source.path = absolute(source.path) if source.path else source.path
    if cfg.generate.prompts_file:
        cfg.generate.prompts_file = absolute(cfg.generate.prompts_file)
    from sdcluster.config.generate import is_hub_lora  # a hub id stays one (staged at launch)

    if cfg.generate.model and not is_hub_id(cfg.generate.model):
        cfg.generate.model = absolute(cfg.generate.model)
    if cfg.generate.lora and not is_hub_lora(cfg.generate.lora):
        cfg.generate.lora = absolute(cfg.generate.lora)
    if is_local(cfg.model.path):
        cfg.model.path = absolute(cfg.model.path)
    if cfg.model.vae_path and is_local(cfg.model.vae_path):  # a hub id stays one, to be named in the error
        cfg.model.vae_path = absolute(cfg.model.vae_path)
    cfg.model.cache_dir = absolute(cfg.model.cache_dir)
    return cfg
