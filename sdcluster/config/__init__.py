"""Typed schema of every config group, and the checks that run on the login node.

Hydra merges the YAML files in ``conf/`` into these dataclasses, so a misspelled key or a wrong type fails
at composition. Value checks live in ``__post_init__`` (they run when ``OmegaConf.to_object`` builds the
objects) and raise :class:`ConfigError` naming the key and the fix. Checks that need several groups at once
are in :func:`check_config`. Nothing here imports Hydra or torch: job functions receive these plain objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the key and how to fix it."""


def _require(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}. Fix: {fix}")


def _choice(value: str | None, key: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"got {value!r}", f"use one of {', '.join(map(str, choices))}")


TASKS = ("train", "generate", "train_generate")
MIXED_PRECISION = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TRACKERS = ("none", "tensorboard", "wandb")
LR_SCHEDULES = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
SCHEDULERS = ("ddim", "euler", "euler_a", "dpmpp", "pndm", "ddpm")


@dataclass
class ModelConfig:
    """Which Stable Diffusion to start from.

    ``path`` is a local diffusers folder or a hub id; the special value ``tiny`` builds the embedded
    random-weight model offline (tests and the default run), so no code path knows which one it got.
    """

    name: str = "tiny"
    path: str = "tiny"
    revision: str | None = None
    variant: str | None = None

    def __post_init__(self) -> None:
        _require(bool(self.path), "model.path", "is empty", "give a local diffusers folder or a hub id")


@dataclass
class DataConfig:
    """A captioned image folder in the ``datasets`` imagefolder layout (images + ``metadata.jsonl``)."""

    name: str = "sample"
    path: str = MISSING
    caption_column: str = "text"
    max_pixels: int = 40_000_000
    num_workers: int = 0
    cache: bool = True
    cache_memory_mb: int = 1024
    holdout: int = 0

    def __post_init__(self) -> None:
        _require(self.max_pixels > 0, "data.max_pixels", "must be > 0", "set a positive pixel limit")
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0", "use 0 for in-process loading")
        _require(
            self.cache_memory_mb >= 0, "data.cache_memory_mb", "must be >= 0", "0 reads the cache from disk"
        )
        _require(
            self.holdout >= 0, "data.holdout", "must be >= 0", "images kept out of training for validation"
        )


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    name: str = "adamw"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    eps: float = 1e-8
    scale_lr: bool = False
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    fused: bool | None = None

    def __post_init__(self) -> None:
        _require(self.name == "adamw", "optim.name", f"got {self.name!r}", "only 'adamw' is supported")
        _require(
            math.isfinite(self.lr) and self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}", "e.g. 1e-5"
        )
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            f"got {list(self.betas)}",
            "two values in [0, 1), e.g. [0.9,0.999]",
        )
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", "e.g. 1e-2")
        _require(self.eps > 0, "optim.eps", "must be > 0", "e.g. 1e-8")
        _choice(self.lr_schedule, "optim.lr_schedule", LR_SCHEDULES)
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", "use 0 for no warmup")
        _require(self.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0", "use 0 to disable clipping")


@dataclass
class TrainConfig:
    """The fine-tuning loop: what the seed passed as ``train_text_to_image.py`` flags."""

    max_steps: int = 40
    batch_size: int = 2
    grad_accum: int = 1
    resolution: int = 64
    center_crop: bool = False
    random_flip: bool = True
    use_ema: bool = False
    ema_decay: float = 0.9999
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    allow_tf32: bool = True
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 20
    checkpoints_keep: int = 2
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    prediction_type: str | None = None
    resume: str = "auto"
    allow_resume_change: bool = False
    validate_every: int = 0
    validation_prompts: list[str] = field(default_factory=list)
    validation_steps: int = 20
    tracker: str = "none"
    tracker_project: str = "sdcluster"

    def __post_init__(self) -> None:
        _require(self.max_steps > 0, "train.max_steps", f"must be > 0, got {self.max_steps}", "e.g. 1000")
        _require(
            self.batch_size > 0, "train.batch_size", f"must be > 0, got {self.batch_size}", "per-device batch"
        )
        _require(
            self.grad_accum > 0,
            "train.grad_accum",
            f"must be > 0, got {self.grad_accum}",
            "use 1 for no gradient accumulation",
        )
        _require(
            self.resolution > 0 and self.resolution % 8 == 0,
            "train.resolution",
            f"must be a positive multiple of 8 (the VAE downsamples by 8), got {self.resolution}",
            f"use {max(8, round(self.resolution / 8) * 8)}",
        )
        _require(0 < self.ema_decay < 1, "train.ema_decay", f"got {self.ema_decay}", "a value in (0, 1)")
        _choice(self.mixed_precision, "train.mixed_precision", MIXED_PRECISION)
        _require(self.log_every > 0, "train.log_every", "must be > 0", "e.g. 10")
        _require(self.checkpoint_every > 0, "train.checkpoint_every", "must be > 0", "e.g. 500")
        _require(
            self.checkpoints_keep >= 2,
            "train.checkpoints_keep",
            f"must be >= 2 so a bad newest checkpoint has a fallback, got {self.checkpoints_keep}",
            "use 2 or more",
        )
        _require(
            self.snr_gamma is None or self.snr_gamma > 0,
            "train.snr_gamma",
            "must be > 0",
            "5.0 is the min-SNR paper's value, null turns it off",
        )
        _require(self.noise_offset >= 0, "train.noise_offset", "must be >= 0", "e.g. 0.05, or 0 for none")
        if self.prediction_type is not None:
            _choice(self.prediction_type, "train.prediction_type", PREDICTION_TYPES)
        _require(
            self.validate_every >= 0, "train.validate_every", "must be >= 0", "0 validates at the end only"
        )
        _require(self.validation_steps > 0, "train.validation_steps", "must be > 0", "e.g. 20")
        _choice(self.tracker, "train.tracker", TRACKERS)
        _require(
            self.resume in ("auto", "never") or bool(self.resume),
            "train.resume",
            "is empty",
            "use auto, never, or a checkpoint folder",
        )


@dataclass
class GenerateConfig:
    """Batched generation: P prompts x ``num_images`` each, in batches of ``batch_size``."""

    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    negative_prompt: str | None = None
    num_images: int = 2
    batch_size: int = 4
    steps: int = 20
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    scheduler: str = "ddim"
    seed: int = 0
    model: str | None = None
    mixed_precision: str = "no"
    shards: int = 1

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


@dataclass
class ClusterConfig:
    """Where jobs run. ``local`` runs them in subprocesses here; ``slurm`` submits with sbatch.

    Site facts (partition, account, setup lines) belong in ``conf/cluster/*.yaml`` or the gitignored
    ``conf/local/``, never in Python.
    """

    name: str = "local"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    timeout_min: int = 600
    constraint: str | None = None
    exclude: str | None = None
    signal_delay_s: int = 120
    max_requeues: int = 3
    max_timeouts: int = 3
    setup: list[str] = field(default_factory=list)
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    array_parallelism: int = 16

    def __post_init__(self) -> None:
        _choice(self.name, "cluster.name", ("local", "slurm"))
        _require(self.nodes > 0, "cluster.nodes", "must be > 0", "e.g. 1")
        _require(self.gpus_per_node >= 0, "cluster.gpus_per_node", "must be >= 0", "0 on CPU nodes")
        _require(self.tasks_per_node > 0, "cluster.tasks_per_node", "must be > 0", "e.g. 1")
        _require(
            self.cpus_per_task is None or self.cpus_per_task > 0,
            "cluster.cpus_per_task",
            "must be > 0",
            "e.g. 8",
        )
        _require(self.timeout_min > 0, "cluster.timeout_min", "must be > 0", "minutes, e.g. 1440")
        _require(self.signal_delay_s >= 0, "cluster.signal_delay_s", "must be >= 0", "seconds, e.g. 120")
        _require(self.max_requeues >= 0, "cluster.max_requeues", "must be >= 0", "e.g. 3")
        _require(self.max_timeouts >= 0, "cluster.max_timeouts", "must be >= 0", "e.g. 3")

    @property
    def processes_per_node(self) -> int:
        """One process per GPU when GPUs are asked for, else ``tasks_per_node`` (CPU nodes)."""
        return self.gpus_per_node if self.gpus_per_node > 0 else self.tasks_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node


@dataclass
class LaunchConfig:
    """How the login-node process behaves: wait or not, submit or only print."""

    wait: bool | None = None
    dry_run: bool = False


@dataclass
class Config:
    """The whole resolved configuration a job receives."""

    task: str = "train_generate"
    run_name: str | None = None
    output_root: str = "outputs"
    jobs_root: str = "jobs"
    cache_root: str = ".cache/sdcluster"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self) -> None:
        _choice(self.task, "task", TASKS)


def check_config(cfg: Config) -> None:
    """Cross-group checks that need more than one group; raise :class:`ConfigError` on the first problem."""
    if cfg.task != "train" and not cfg.generate.prompts and not cfg.generate.prompts_file:
        raise ConfigError(
            "generate.prompts: no prompts for a generation task. Fix: set generate.prompts='[\"a photo\"]' "
            "or generate.prompts_file=FILE (one prompt a line), or use task=train"
        )
    if cfg.cluster.name == "local" and cfg.cluster.world_size > 1:
        raise ConfigError(
            f"cluster.tasks_per_node/nodes: the local executor runs one process, got world size "
            f"{cfg.cluster.world_size}. Fix: use +cluster=slurm for several processes"
        )
    if cfg.train.mixed_precision != "no" and cfg.cluster.gpus_per_node == 0 and cfg.cluster.name == "slurm":
        raise ConfigError(
            f"train.mixed_precision={cfg.train.mixed_precision} needs GPUs but cluster.gpus_per_node=0. "
            "Fix: set cluster.gpus_per_node, or train.mixed_precision=no on CPU nodes"
        )
