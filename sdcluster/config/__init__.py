"""Typed schema of every config group, and the checks that run on the login node.

One module per config group, mirroring ``conf/``: :mod:`.model`, :mod:`.data`, :mod:`.optim`,
:mod:`.train`, :mod:`.generate`, :mod:`.cluster`; :mod:`.checks` holds :class:`ConfigError` and the allowed
values. The schema is the one source of defaults and of what each key means (a docstring under every field,
and which keys are part of a run's identity); a YAML file in ``conf/`` only holds what distinguishes its
option or override bundle, never a restated default.

Hydra merges the YAML files in ``conf/`` into these dataclasses, so a misspelled key or a wrong type fails
at composition. Value checks live in ``__post_init__`` (they run when ``OmegaConf.to_object`` builds the
objects) and raise :class:`ConfigError` naming the key and the fix. Checks that need several groups at once
are in :func:`check_config`. Nothing here imports Hydra or torch: job functions receive these plain objects
(:mod:`.store` is the one module that registers the schema with Hydra).

The bottom wing: the schema asks only what kind of source a model path names; ``store`` imports Hydra
inside its functions.

May import: ``model_source``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sdcluster.config.checks import (
    LR_SCHEDULES,
    MIXED_PRECISION,
    PREDICTION_TYPES,
    ROOTS,
    SCHEDULERS,
    TASKS,
    TRACKERS,
    ConfigError,
    Schema,
    _choice,
    _no_control,
    _require,
    check_root,
)
from sdcluster.config.cluster import CLUSTERS, ClusterConfig
from sdcluster.config.data import SAMPLE_PROMPTS, DataConfig
from sdcluster.config.generate import GenerateConfig
from sdcluster.config.model import ModelConfig
from sdcluster.config.optim import OPTIMIZERS, OptimBase, OptimConfig
from sdcluster.config.train import TrainConfig

__all__ = [
    "CLUSTERS",
    "LR_SCHEDULES",
    "MIXED_PRECISION",
    "PREDICTION_TYPES",
    "SAMPLE_PROMPTS",
    "SCHEDULERS",
    "TASKS",
    "TRACKERS",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "GenerateConfig",
    "LaunchConfig",
    "ModelConfig",
    "OptimBase",
    "OptimConfig",
    "TrainConfig",
    "check_config",
    "check_resolution",
]


@dataclass
class LaunchConfig(Schema):
    """How the login-node process behaves: wait or not, submit or only print."""

    wait: bool | None = None
    """Wait for the jobs and report how they ended; null: wait with the local executor, not on SLURM."""
    dry_run: bool = False
    """Run every check and print what would be submitted (sbatch script included), but submit nothing."""


@dataclass
class Config(Schema):
    """The whole resolved configuration a job receives."""

    task: str = "train_generate"
    """train, generate (from generate.model or a finished run), train_generate: train, then generate; or
    cache: build the latent cache of the training data as an array of data.cache_shards tasks (a training
    task with data.cache_shards > 1 queues that array first and waits on it)."""
    run_name: str | None = None
    """Names the run folder instead of model.name (the hash stays); null: the model's name."""
    output_root: str = "outputs"
    """Where runs, generated images and sweeps are written: runs/<name>-<hash>, generate/, sweeps/."""
    jobs_root: str = "jobs"
    """Where each scheduler job gets its folder: logs, sbatch script, config.yaml, job.json."""
    cache_root: str = ".cache/sdcluster"
    """The built tiny model and the latent caches, shared by every run that can reuse them."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Which Stable Diffusion to start from (``conf/model/``)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The captioned images to train on (``conf/data/``)."""
    optim: OptimBase = field(default_factory=OptimConfig)  # each option's own schema: config.optim
    """The optimizer and its learning-rate schedule (``conf/optim/``); default: AdamW."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The fine-tuning loop (``conf/train/``)."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """Generation after training, or from any pipeline with task=generate (``conf/generate/``)."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Where the jobs run (``conf/cluster/``, appended with +cluster=slurm); default: locally."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """How the login-node process behaves (command line only)."""

    @property
    def trains(self) -> bool:
        """Whether a training job is submitted (``task=train`` or ``train_generate``)."""
        return self.task in ("train", "train_generate")

    @property
    def generates(self) -> bool:
        """Whether a generation job is submitted (``task=generate`` or ``train_generate``)."""
        return self.task in ("generate", "train_generate")

    @property
    def reads_training_data(self) -> bool:
        """Whether a job reads the training data: training, and a latent-cache build (``task=cache``)."""
        return self.trains or self.task == "cache"

    def __post_init__(self) -> None:
        _choice(self.task, "task", TASKS)
        self.train.default_length()
        check_sharding(self.optim, self.train.shards)
        for key in ("run_name", "output_root", "jobs_root", "cache_root"):  # paths reach the job script
            _no_control(getattr(self, key), key)
        for key in ROOTS:
            check_root(getattr(self, key), key)


def check_sharding(optim: OptimBase, shards: bool) -> None:
    """Refuse an optimizer (or its settings) that cannot step ``train.strategy=fsdp``'s sharded parameters
    before the queue (in the job its first step would fail), asking the schema, not naming it."""
    problem = optim.sharding_problem() if shards else None
    shardable = " or ".join(f"optim={name}" for name, opt in OPTIMIZERS.items() if opt.UNSHARDABLE is None)
    _require(
        not problem,
        "optim",
        f"optim={optim.name} cannot train with train.strategy=fsdp: {problem}",
        f"use {shardable} (default settings) with train.strategy=fsdp, or train.strategy=ddp",
    )


RECIPES = {512: ("sd15", ("sd15_full", "sd15_lora")), 1024: ("sdxl", ("sdxl_lora",))}
"""By native resolution: the model option of the generic recipes in ``conf/experiment/`` and their names."""


def check_resolution(cfg: Config) -> None:
    """A pretrained model fine-tuned at another size than its own relearns its details (``model=sd15`` alone
    keeps the tiny model's 64 px): refuse, naming the recipe made for the model."""
    native, size = cfg.model.native_resolution, cfg.train.resolution
    if not cfg.reads_training_data or native is None or size == native:
        return
    use = ""
    if native in RECIPES:
        model, (first, *others) = RECIPES[native]
        other_model = f" model={cfg.model.name}" if cfg.model.name != model else ""
        alternatives = f" (or {', '.join(others)})" if others else ""
        recipe = f"experiment={first}{alternatives}{other_model} data.path=DIR"
        use = f"use a recipe made for {native} px, {recipe}, or "
    raise ConfigError(
        f"train.resolution={size}, but model {cfg.model.name} ({cfg.model.path}) was trained at {native} px "
        f"(model.native_resolution). Fix: {use}set train.resolution={native}; when model.path is a "
        f"model of {size} px, or to train at {size} px on purpose, set model.native_resolution={size} "
        "(null: no check)"
    )


def check_config(cfg: Config) -> None:
    """Cross-group checks that need more than one group; raise :class:`ConfigError` on the first problem.

    What a config needs of the executor it chose (one process locally, GPUs for mixed precision on a
    cluster) its backend checks next (``check_config`` of :mod:`sdcluster.cluster.backends`)."""
    check_resolution(cfg)
    if cfg.task == "cache" and not cfg.data.cache:
        raise ConfigError(
            "task=cache builds the latent cache, but data.cache=false. Fix: data.cache=true (training jobs "
            "then read the cache), or task=train to train without one"
        )
    if cfg.trains and cfg.data.cache_shards > 1 and not cfg.data.cache:
        raise ConfigError(
            f"data.cache_shards={cfg.data.cache_shards} builds the latent cache as an array before training, "
            "but data.cache=false. Fix: data.cache=true, or drop data.cache_shards to train without a cache"
        )
    if cfg.generates and not cfg.generate.prompts and not cfg.generate.prompts_file:
        raise ConfigError(
            "generate.prompts: no prompts for a generation task. Fix: set generate.prompts='[\"a photo\"]' "
            "or generate.prompts_file=FILE (one prompt a line), or use task=train"
        )
    a_lora = cfg.generate.lora or (cfg.train.trains_adapters and not cfg.generate.model)
    if cfg.generate.lora_scale != 1.0 and not a_lora:
        raise ConfigError(
            "generate.lora_scale: there is no LoRA to scale (generate.lora is null and no LoRA run is "
            "generated from). Fix: set generate.lora=PATH, or train with train.method=lora"
        )
