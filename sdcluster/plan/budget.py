"""Each GPU's bytes for a training config: weights, gradients, optimizer state, EMA, frozen, activations.

Pure arithmetic on :class:`~sdcluster.plan.sizes.ModelSizes` and a :class:`Setup` (the settings memory
depends on, read once from a config), so the cheapest change that fits (:mod:`sdcluster.plan.fit`) is found
by planning again with each change, not by a rule of thumb. Per part, as the training job holds it
(:mod:`sdcluster.train.trainer`, :mod:`sdcluster.train.method`, :mod:`sdcluster.train.ema`):

- **weights**: a full fine-tune trains the denoiser in float32 (mixed precision is autocast, which also keeps
  a half-precision copy of each weight for the forward: counted here, unless the activations measured on a
  GPU hold them already); LoRA keeps the frozen denoiser in the
  half type under mixed precision and its adapters in float32;
- **gradients**: float32, one per trained parameter; DDP on several processes holds a second copy in its
  communication buckets (torch's ``gradient_as_bucket_view`` is off, as accelerate leaves it);
- **optimizer state**: what the optimizer keeps for each trained tensor (its schema counts it by shape);
- **EMA**: one float32 copy of what is trained; none on the GPU with ``train.ema_offload``;
- **frozen**: the VAE, and the text encoders unless the steps read their outputs from the latent cache
  (``data.cache``, the text encoders not trained: the job then holds none while it trains,
  :mod:`sdcluster.models.text_encoders`), in the half type under mixed precision except a VAE its family
  keeps in float32. A cache build inside the training job holds them before the first step, beside the
  weights: :attr:`Plan.before_steps`, part of :attr:`Plan.peak` unless ``data.cache_shards`` > 1 builds the
  cache in an array job of its own;
- **activations**: what a micro-step needs above the weights and gradients at its peak
  (:mod:`sdcluster.plan.activations`): the gradients grow while the activations are freed, so a full
  fine-tune's is the measured excess late in the backward pass, not the activations' own size (which partly
  shares the gradients' memory); a LoRA step, whose gradients are small, peaks at the forward's end, with
  what the forward saved.

A sharded strategy (``train.strategy=fsdp``) divides weights, gradients, optimizer state and EMA of the
trained module by the number of processes and gathers one block at a time (two, with the next one
prefetched); its CPU offload keeps parameters, gradients and optimizer state off the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sdcluster.plan.activations import Activations, activation_bytes
from sdcluster.plan.sizes import ModelSizes

FP32, HALF = 4, 2
GIB = 1024**3


@dataclass(frozen=True)
class Setup:
    """The settings one GPU's memory depends on, read from a config (:func:`sdcluster.plan.fit.setup_of`)."""

    sizes: ModelSizes
    trains_adapters: bool
    shards: bool
    """A sharded strategy (:attr:`sdcluster.config.TrainConfig.shards`): weights, gradients, optimizer state
    and EMA divided over all of the job's processes."""
    offload: bool
    """The sharded strategy's CPU offload of parameters, gradients and optimizer state."""
    processes: int
    optimizer_state: int
    """Bytes of optimizer state for everything trained (as the optimizer's schema counts them)."""
    half: bool
    """Mixed precision (fp16 or bf16)."""
    ema: bool
    ema_offload: bool
    checkpointing: bool
    resolution: int
    batch: int
    accumulation: bool = False
    """Gradient accumulation (``train.grad_accum`` > 1): a micro-step's forward runs with the gradients of
    the earlier ones alive."""
    text_cached: bool = False
    """The steps read the text encoders' outputs from the latent cache: no encoder is held while training."""
    builds_cache: bool = False
    """The training job may build the cache itself (with its encoders and weights loaded) before its steps."""

    def but(self, **changes: object) -> Setup:
        return replace(self, **changes)


@dataclass(frozen=True)
class Plan:
    """One GPU's bytes by part (in the order the table prints them) and where the activations came from."""

    parts: dict[str, int]
    activations: Activations
    setup: Setup
    before_steps: int = 0
    """What a cache build in the job holds before the first step (weights, VAE, text encoders); 0 when the
    text encoders are held throughout (counted in the parts) or the build runs in a job of its own."""

    @property
    def total(self) -> int:
        """What the training steps hold."""
        return sum(self.parts.values())

    @property
    def peak(self) -> int:
        """The job's most: the steps', or a cache build's before them."""
        return max(self.total, self.before_steps)

    def table(self, budget_gib: float | None = None) -> list[str]:
        """The plan as aligned lines: one per part, the total, and the budget when there is one (in MiB
        when the whole plan is under 1 GiB, as the tiny model's is)."""
        unit, size = ("GiB", GIB) if self.total >= GIB else ("MiB", 1024**2)
        lines = [f"  {part:<18} {n / size:9.2f} {unit}" for part, n in self.parts.items()]
        lines[-1] += f"  ({self.activations.basis})"
        lines.append(f"  {'total':<18} {self.total / size:9.2f} {unit} per GPU")
        if self.before_steps:
            lines.append(
                f"  {'cache build':<18} {self.before_steps / size:9.2f} {unit} before the first step "
                "(weights, VAE, text encoders), if the job builds the latent cache itself"
            )
        if budget_gib is not None:
            verdict = "fits" if self.peak <= budget_gib * GIB else "does NOT fit"
            lines.append(f"  {'cluster.gpu_mem_gb':<18} {budget_gib * GIB / size:9.2f} {unit}: {verdict}")
        return lines


def trained_params(setup: Setup) -> int:
    sizes = setup.sizes
    return sizes.denoiser_adapters + sizes.encoder_adapters if setup.trains_adapters else sizes.denoiser


def _weights(setup: Setup, copies_counted: bool = False) -> int:
    """The trained module's resident weights, before any sharding."""
    sizes = setup.sizes
    if setup.trains_adapters:  # the frozen base in the half type (mixed precision), adapters in float32
        return sizes.denoiser * (HALF if setup.half else FP32) + sizes.denoiser_adapters * FP32
    autocast_copies = sizes.denoiser * HALF if setup.half and not copies_counted else 0
    return sizes.denoiser * FP32 + autocast_copies


def _frozen(setup: Setup, encoders_held: bool) -> int:
    sizes, element = setup.sizes, HALF if setup.half else FP32
    vae = sizes.frozen.get("vae", 0) * (FP32 if sizes.vae_stays_fp32 else element)
    encoders = sum(n for name, n in sizes.frozen.items() if name != "vae") * element if encoders_held else 0
    return vae + encoders + (sizes.encoder_adapters * FP32 if setup.trains_adapters else 0)


def plan(setup: Setup) -> Plan:
    """One GPU's bytes for ``setup``."""
    share = setup.processes if setup.shards else 1
    trained = trained_params(setup)
    resident = 0 if setup.shards and setup.offload else 1  # offloaded: on the CPU between uses
    gathered = 2 * setup.sizes.largest_block * FP32 if setup.shards else 0
    acts = activation_bytes(
        setup.sizes.family,
        setup.sizes.denoiser,
        setup.sizes.denoiser_width,
        setup.resolution,
        setup.batch,
        setup.checkpointing,
        half=setup.half,
        adapters=setup.trains_adapters,
        sequence=setup.sizes.token_sequence,
    )
    weights = resident * _weights(setup, acts.holds_autocast_copies) // share + gathered
    # Sharded, each rank casts the blocks it gathers: its share of the copies (an estimate: measured on one
    # GPU only, where FSDP's peak sat 1% under this plan without them and 7% over it with them all).
    acts = replace(acts, unsaved_copies=acts.unsaved_copies // share)
    gradients = resident * trained * FP32 // share
    buckets = gradients if not setup.shards and setup.processes > 1 else 0  # DDP's copy, across steps
    acts = acts.above_gradients(gradients + buckets, buckets + (gradients if setup.accumulation else 0))
    parts = {
        "weights": weights,
        "gradients": gradients + buckets,
        "optimizer state": resident * setup.optimizer_state // share,
        "EMA": 0 if not setup.ema or setup.ema_offload else trained * FP32 // share,
        "frozen parts": _frozen(setup, encoders_held=not setup.text_cached),
        "activations": acts.bytes,
    }
    # the optimizer state is made at the first step: a build before it holds the weights and frozen parts
    building = setup.text_cached and setup.builds_cache
    before = weights + _frozen(setup, encoders_held=True) if building else 0
    return Plan(parts, acts, setup, before)
