"""The ``train`` group (``conf/train/``): the fine-tuning loop."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

from sdcluster.config.checks import (
    MIXED_PRECISION,
    PREDICTION_TYPES,
    TRACKERS,
    TRAIN_METHODS,
    Schema,
    _choice,
    _require,
)
from sdcluster.config.data import SAMPLE_PROMPTS
from sdcluster.config.export_formats import check_export_formats

DEFAULT_MAX_STEPS = 40
"""``train.max_steps`` when neither it nor ``train.epochs`` is set."""

TRAIN_STRATEGIES = {"ddp": False, "fsdp": True}
"""``train.strategy`` -> whether it shards the trained weights over the ranks. The one place the schema names
strategies; :data:`sdcluster.train.strategy.STRATEGIES` implements each (a test keeps them in step)."""

LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
"""The UNet's attention projections (query, key, value, output): where diffusers' LoRA examples adapt it."""


@dataclass
class LoraConfig(Schema):
    """Low-rank adapters (``peft``) trained instead of the UNet's weights, with ``train.method=lora``."""

    rank: int = 4
    """Rank of each adapter: more capacity, a bigger file (4-16 is the usual range for a style or object)."""
    alpha: float | None = None
    """Adapter scale numerator (the update is scaled by alpha / rank); null: equal to rank, a scale of 1."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training, against overfitting very small datasets; 0: none."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Names of the UNet modules that get adapters (peft matches the end of each module's name); mixing
    attention and other layers makes a file diffusers 0.42 loads only partly (docs/reference/training.md)."""
    text_encoder_lr: float | None = None
    """Also adapt the text encoder's attention, at this learning rate (e.g. 5e-5); null: it stays frozen."""
    fuse_export: bool = False
    """Also export a full pipeline with the adapters fused into the UNet (loads without LoRA support)."""

    NOT_IDENTITY: ClassVar[tuple[str, ...]] = ("fuse_export",)
    """Adapter keys that do not change what a run learns: changing one keeps the run folder."""

    def __post_init__(self) -> None:
        _require(self.rank > 0, "train.lora.rank", f"must be > 0, got {self.rank}", "e.g. 4, 8 or 16")
        _require(
            self.alpha is None or self.alpha > 0,
            "train.lora.alpha",
            f"must be > 0, got {self.alpha}",
            "e.g. the rank, or null for alpha = rank",
        )
        _require(0 <= self.dropout < 1, "train.lora.dropout", f"got {self.dropout}", "a value in [0, 1)")
        _require(
            bool(self.target_modules),
            "train.lora.target_modules",
            "is empty",
            f"use module names such as {list(LORA_TARGETS)}",
        )
        _require(
            self.text_encoder_lr is None or self.text_encoder_lr > 0,
            "train.lora.text_encoder_lr",
            f"must be > 0, got {self.text_encoder_lr}",
            "e.g. 5e-5, or null to keep the text encoder frozen",
        )

    def changed_keys(self) -> list[str]:
        """The keys set to something other than their default (refused with ``train.method=full``)."""
        default = LoraConfig()
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)]


@dataclass
class TrainConfig(Schema):
    """The fine-tuning loop: what the seed passed as ``train_text_to_image.py`` flags."""

    max_steps: int | None = None
    """Optimizer steps to train for (the seed trained 15,000); null: what train.epochs makes, else 40."""
    epochs: int | None = None
    """Train for this many passes over the training split instead of train.max_steps (then null): counted
    in optimizer steps at submission from the images after data.holdout and data.max_samples, the batch size,
    grad_accum and world size (with data.buckets: each bucket's whole batches); null: max_steps decides."""
    batch_size: int = 2
    """Images per device per micro-step; the effective batch is batch_size x grad_accum x world size."""
    grad_accum: int = 1
    """Micro-steps accumulated per optimizer step: a larger effective batch without more memory."""
    resolution: int = 64
    """Training image size in pixels (square, a multiple of 8): shorter side resized to it, then cropped."""
    center_crop: bool = False
    """Crop the center of each resized image; false: a random crop, an augmentation."""
    random_flip: bool = True
    """Mirror images horizontally at random, an augmentation; turn off for asymmetric subjects like text."""
    use_ema: bool = False
    """Keep an exponential moving average of the UNet weights and export it (smoother, one more UNet copy)."""
    ema_decay: float = 0.9999
    """EMA decay per optimizer step; closer to 1 averages over more steps."""
    ema_offload: bool = False
    """Keep the EMA in CPU memory, on the GPU only for its update (diffusers' offload_ema): one UNet copy
    less GPU memory (3.2 GiB for SD 1.x), two copies over the bus a step; on CPU-only nodes a no-op."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass: much less GPU memory for some more time."""
    strategy: str = "ddp"
    """How the trained weights live on the ranks: ddp (a whole copy of weights, gradients, optimizer state
    and EMA on every GPU) or fsdp (all four sharded over every GPU of every node, torch's FSDP2: a GPU holds
    1/N of them, a LoRA run's frozen base too; docs/performance.md says when to pick it)."""
    fsdp_offload: bool = False
    """With train.strategy=fsdp: keep the parameter shards and the optimizer state in CPU memory, on the GPU
    only for each block's forward and backward (less GPU memory, much slower steps); a no-op on CPU nodes."""
    mixed_precision: str = "no"
    """Train in fp16 or bf16 (GPUs only, faster and lighter); no: float32."""
    allow_tf32: bool = True
    """Let GPUs with TF32 use it for float32 matmuls and convolutions (faster, slightly less precise)."""
    seed: int = 0
    """Seed of training's random streams (data order, augmentation, noise, timesteps), not of the holdout."""
    log_every: int = 10
    """Optimizer steps between loss/LR reports in the log and ``metrics.jsonl``."""
    checkpoint_every: int = 20
    """Optimizer steps between checkpoints; a preempted or timed-out job also saves when signalled."""
    checkpoints_keep: int = 2
    """Complete checkpoints kept in the run folder (at least 2, so a broken newest one has a fallback)."""
    snr_gamma: float | None = None
    """Min-SNR loss weighting gamma (5.0 is the paper's value) for faster convergence; null: plain MSE."""
    noise_offset: float = 0.0
    """Offset-noise scale (e.g. 0.05) so the model learns very dark or bright images; 0: none."""
    prediction_type: str | None = None
    """Train the UNet to predict epsilon or v_prediction; null: what the model's noise scheduler says."""
    resume: str = "auto"
    """auto: the newest complete checkpoint of this run; never: start over; or a checkpoint folder."""
    allow_resume_change: bool = False
    """Resume with another batch size, grad_accum or world size, remapping the data position."""
    validate_every: int = 20
    """Optimizer steps between held-out loss + validation images; 0 validates at the end only."""
    validation_prompts: list[str] = field(default_factory=lambda: list(SAMPLE_PROMPTS[:1]))
    """Prompts rendered at each validation (fixed seeds, a ``grid.png``); empty: the loss only."""
    validation_steps: int = 20
    """Denoising steps of the validation images (with generate.scheduler, at train.resolution)."""
    tracker: str = "none"
    """Also log to tensorboard or wandb (one run per run folder across requeues); none: metrics.jsonl only."""
    tracker_project: str = "sdcluster"
    """The W&B project runs are logged to (with tracker=wandb)."""
    method: str = "full"
    """full: train every UNet weight; lora: train small adapters (train.lora), a small file for any base."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapters of ``train.method=lora`` (setting one with method=full is refused)."""
    export_formats: list[str] = field(default_factory=lambda: ["diffusers"])
    """What the export writes: diffusers (always: a pipeline, or ``pytorch_lora_weights.safetensors``); add
    kohya for a LoRA run's ``<run>_kohya.safetensors`` that ComfyUI and A1111 load (``[diffusers,kohya]``), or
    single_file for the model as one ``model/<run>.safetensors`` in the original Stable Diffusion layout
    (``[diffusers,single_file]``: a full run, or a LoRA run with ``train.lora.fuse_export=true``)."""
    export_fp16: bool = False
    """Write the single-file checkpoint in fp16 (half the size, as most shared checkpoints are); false: in
    the dtype the pipeline is saved in (float32)."""

    NOT_IDENTITY: ClassVar[tuple[str, ...]] = (
        "log_every",
        "checkpoint_every",
        "checkpoints_keep",
        "resume",
        "allow_resume_change",
        "validate_every",
        "validation_prompts",
        "validation_steps",
        "tracker",
        "tracker_project",
        "ema_offload",
        "epochs",  # counted into max_steps before submission: the same steps are the same run
        "fsdp_offload",
        "export_formats",
        "export_fp16",
    )
    """Keys that do not change what a run learns: changing one keeps the run folder (and so resumes it)."""
    IDENTITY_WHEN_SET: ClassVar[tuple[str, ...]] = ("strategy",)
    """Keys that join the run's identity only when set to something other than their default, so that runs
    from before the key existed keep their folders. ``strategy``: FSDP sums gradients in another order than
    DDP (weights apart in the last bits, so a resume could not be bit-exact across the change) and its
    checkpoints are in another format, so an FSDP run is a run of its own."""

    def default_length(self) -> None:
        """Neither ``max_steps`` nor ``epochs`` set: ``max_steps`` is what it has always defaulted to. Not
        in ``__post_init__``: OmegaConf makes the schema's defaults by calling this class, so a default
        filled in there would read as a ``max_steps`` set next to ``train.epochs``."""
        if self.max_steps is None and self.epochs is None:
            self.max_steps = DEFAULT_MAX_STEPS

    @property
    def shards(self) -> bool:
        """Whether ``strategy`` shards the trained weights over the ranks (FSDP) rather than replicating
        them: what checks ask instead of comparing strategy names."""
        return TRAIN_STRATEGIES[self.strategy]

    @property
    def trains_adapters(self) -> bool:
        """Whether ``method`` trains adapters (``train.lora``) rather than the denoiser's own weights: what
        run identity, outputs and checks ask instead of comparing method names."""
        return TRAIN_METHODS[self.method] is not None

    @property
    def exports_pipeline(self) -> bool:
        """Whether the run writes a full pipeline to ``model/``: a full fine-tune always, adapters only
        when fused on export."""
        return not self.trains_adapters or self.lora.fuse_export

    def _check_sharding(self) -> None:
        """What FSDP does not do (yet), refused before the queue rather than in the job."""
        _require(
            self.shards or not self.fsdp_offload,
            "train.fsdp_offload",
            "offloads FSDP shards, but train.strategy=ddp shards nothing",
            "add train.strategy=fsdp, or drop train.fsdp_offload",
        )
        _require(
            not (self.shards and self.trains_adapters and self.lora.text_encoder_lr is not None),
            "train.lora.text_encoder_lr",
            "trains the text encoders' adapters, which train.strategy=fsdp does not shard (only the UNet)",
            "drop train.lora.text_encoder_lr to train the UNet's adapters sharded, or use train.strategy=ddp",
        )
        _require(
            not (self.shards and self.mixed_precision == "fp16"),
            "train.mixed_precision",
            "fp16 needs a loss scaler, which train.strategy=fsdp does not run",
            "use train.mixed_precision=bf16 with fsdp",
        )

    def __post_init__(self) -> None:
        for key, fix in (("max_steps", "e.g. 1000"), ("epochs", "e.g. 10, or null to train for max_steps")):
            value = getattr(self, key)
            _require(value is None or value > 0, f"train.{key}", f"must be > 0, got {value}", fix)
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
        _require(
            self.use_ema or not self.ema_offload,
            "train.ema_offload",
            "there is no EMA to offload (train.use_ema is false)",
            "set train.use_ema=true, or drop train.ema_offload",
        )
        _choice(self.mixed_precision, "train.mixed_precision", MIXED_PRECISION)
        _choice(self.strategy, "train.strategy", tuple(TRAIN_STRATEGIES))
        self._check_sharding()
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
        _choice(self.method, "train.method", tuple(TRAIN_METHODS))
        changed = self.lora.changed_keys() if not self.trains_adapters else []
        _require(
            not changed,
            f"train.lora.{changed[0] if changed else ''}",
            "is set, but train.method=full trains no adapters",
            "add train.method=lora to train adapters, or drop the train.lora.* settings for a full fine-tune",
        )
        check_export_formats(self)
        _require(
            self.resume in ("auto", "never") or bool(self.resume),
            "train.resume",
            "is empty",
            "use auto, never, or a checkpoint folder",
        )
