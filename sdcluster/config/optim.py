"""The ``optim`` group (``conf/optim/``): the optimizer, a schema per option, and its learning-rate schedule.

:class:`OptimBase` holds what every optimizer shares (its name, the learning rate and its schedule, gradient
clipping); each option is a subclass with its own settings: ``optim=adamw`` (:class:`OptimConfig`, today's
and the default), ``optim=adamw8bit``, ``optim=adafactor`` and ``optim=prodigy``. Each
``conf/optim/<name>.yaml`` extends its schema from the config store (:mod:`.store`), so Hydra refuses a
key of another optimizer.

A run's identity is the whole ``optim`` node (:mod:`sdcluster.identity`): another optimizer, or another
setting of one, is another run; AdamW's keys are the ones runs have always been hashed with. The torch
optimizers are built by :mod:`sdcluster.train.optimizers`; what their state costs is said here
(:meth:`OptimBase.state_bytes` of a tensor, :meth:`OptimBase.state_bytes_per_param` on average), so the
login node can plan memory without torch.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from typing import ClassVar

from sdcluster.config.checks import LR_SCHEDULES, ConfigError, Schema, _choice, _require


@dataclass
class OptimBase(Schema):
    """What every optimizer shares: the learning rate and its schedule, and gradient clipping."""

    name: str = "adamw"
    """The optimizer, chosen with ``optim=NAME`` (``conf/optim/``): adamw, adamw8bit, adafactor, prodigy."""
    lr: float = 1e-4
    """Peak learning rate, before ``scale_lr``; the seed fine-tuned SD 1.4 with 1e-5."""
    scale_lr: bool = False
    """Multiply lr by batch_size x grad_accum x world size, to keep the step per sample as the batch grows."""
    lr_schedule: str = "constant"
    """How the LR moves over max_steps; with the constant ones raising max_steps continues the same run."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to lr (``constant`` ignores it); 0 starts at full lr."""
    max_grad_norm: float = 1.0
    """Clip the gradients' global norm to this before each optimizer step; 0 disables clipping."""

    STEPS_FREE_SCHEDULES: ClassVar[tuple[str, ...]] = ("constant", "constant_with_warmup")
    """Schedules whose LR does not depend on train.max_steps, which is then not part of the run's identity."""
    REQUIRES: ClassVar[tuple[str, str] | None] = None
    """(module, the command that installs it) where the optimizer needs a package sdcluster does not."""
    UNSHARDABLE: ClassVar[str | None] = None
    """Why it cannot step FSDP's sharded (``DTensor``) parameters whatever its settings; None: it can."""
    OPTIONS: ClassVar[dict[str, type[OptimBase]]] = {}
    """``optim=NAME`` -> its schema (filled below, :data:`OPTIMIZERS`): where the key checks and the options
    reference find the keys of every option, not only the default's."""

    def __post_init__(self) -> None:
        own = next((name for name, schema in OPTIMIZERS.items() if schema is type(self)), None)
        _require(
            self.name == own,
            "optim.name",
            f"got {self.name!r} with the settings of optim={own}",
            f"choose the optimizer as a config group, optim={self.name} (optim.name only names it)",
        )
        _require(
            math.isfinite(self.lr) and self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}", "e.g. 1e-5"
        )
        _choice(self.lr_schedule, "optim.lr_schedule", LR_SCHEDULES)
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", "use 0 for no warmup")
        _require(self.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0", "use 0 to disable clipping")
        if self.REQUIRES and importlib.util.find_spec(self.REQUIRES[0]) is None:
            module, install = self.REQUIRES
            raise ConfigError(
                f"optim={self.name}: needs the Python package {module}, which is not installed. Fix: "
                f"{install} (in the environment the jobs run in), or choose another optimizer, e.g. "
                "optim=adamw"
            )

    def sharding_problem(self) -> str | None:
        """Why these settings cannot train with ``train.strategy=fsdp`` (a cross-group check asks)."""
        return self.UNSHARDABLE

    def state_bytes(self, shape: tuple[int, ...], dtype_bytes: int) -> int:
        """Bytes of state the optimizer keeps for one trained tensor of ``shape`` whose elements take
        ``dtype_bytes`` (4: float32, as trained weights are here); what the memory plan sums."""
        raise NotImplementedError

    def state_bytes_per_param(self, dtype_bytes: int) -> float:
        """Bytes of optimizer state per trained parameter of a large weight matrix (4096 x 4096): AdamW 8,
        8-bit AdamW ~2, Adafactor ~0 (4 with ``beta1``), Prodigy 16; small tensors cost more per element."""
        return self.state_bytes(_LARGE, dtype_bytes) / math.prod(_LARGE)


def _check_betas(betas: list[float]) -> None:
    _require(
        len(betas) == 2 and all(0 <= b < 1 for b in betas),
        "optim.betas",
        f"got {list(betas)}",
        "two values in [0, 1), e.g. [0.9,0.999]",
    )


@dataclass
class OptimConfig(OptimBase):
    """``optim=adamw``: torch's AdamW, two float32 moments per trained parameter (8 bytes each)."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's decay rates of its running averages of the gradient and of its square."""
    weight_decay: float = 1e-2
    """AdamW's decoupled weight decay: pulls weights toward 0 at every step, scaled by the LR."""
    eps: float = 1e-8
    """AdamW's epsilon, added to the denominator for numerical stability."""
    fused: bool | None = None
    """Use torch's fused AdamW (one kernel per step); null: fused wherever torch supports it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_betas(self.betas)
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", "e.g. 1e-2")
        _require(self.eps > 0, "optim.eps", "must be > 0", "e.g. 1e-8")

    def state_bytes(self, shape: tuple[int, ...], dtype_bytes: int) -> int:
        return 2 * math.prod(shape) * dtype_bytes + 4  # exp_avg and exp_avg_sq, and a float32 step


AdamWConfig = OptimConfig
"""``optim=adamw`` by what it is; the class keeps the name configs were pickled with (queued jobs)."""


@dataclass
class AdamW8bitConfig(OptimBase):
    """``optim=adamw8bit``: bitsandbytes' AdamW with block-wise 8-bit moments, about 2 bytes per parameter.

    Same update as AdamW, with each moment stored as one byte per element plus a float32 scale per block of
    256; the rounding makes its steps differ slightly from AdamW's. Needs
    ``pip install 'sdcluster[adamw8bit]'``.
    """

    name: str = "adamw8bit"
    """The optimizer: 8-bit AdamW (bitsandbytes)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Decay rates of the running averages of the gradient and of its square, as AdamW's."""
    weight_decay: float = 1e-2
    """Decoupled weight decay, as AdamW's."""
    eps: float = 1e-8
    """Added to the denominator for numerical stability, as AdamW's."""
    min_8bit_size: int = 4096
    """Tensors with fewer elements keep 32-bit moments (biases, norms): too small to save memory, and the
    quantization error is largest there."""

    BLOCK: ClassVar[int] = 256
    """Elements per quantization block on every device (bitsandbytes' block-wise optimizers)."""
    REQUIRES: ClassVar[tuple[str, str] | None] = ("bitsandbytes", "pip install 'sdcluster[adamw8bit]'")
    """The 8-bit kernels (CPU and CUDA) come from bitsandbytes, an optional extra."""
    UNSHARDABLE: ClassVar[str | None] = "bitsandbytes' 8-bit kernels take plain tensors, not DTensor shards"
    """Its first step on FSDP2's parameters fails: the kernels refuse a DTensor next to plain tensors."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_betas(self.betas)
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", "e.g. 1e-2")
        _require(self.eps > 0, "optim.eps", "must be > 0", "e.g. 1e-8")
        _require(self.min_8bit_size >= 1, "optim.min_8bit_size", "must be >= 1", "e.g. 4096")

    def state_bytes(self, shape: tuple[int, ...], dtype_bytes: int) -> int:
        n = math.prod(shape)
        if n < self.min_8bit_size:
            return 2 * n * 4  # two float32 moments
        # two uint8 moments, a float32 absmax per block of each, and each one's 256-entry float32 code book
        return 2 * (n + 4 * math.ceil(n / self.BLOCK) + 256 * 4)


@dataclass
class AdafactorConfig(OptimBase):
    """``optim=adafactor``: transformers' Adafactor, whose second moment of a matrix is one row and one
    column of numbers (factored), nearly no state without ``beta1``.

    Driven by ``optim.lr`` and ``optim.lr_schedule`` like the others: Adafactor's own relative step size
    (``relative_step``) would ignore both, so it is off.
    """

    name: str = "adafactor"
    """The optimizer: Adafactor (transformers)."""
    beta1: float | None = None
    """Decay of a first moment (momentum), which costs a full float32 copy of the weights; null: none."""
    decay_rate: float = -0.8
    """Exponent of the second moment's decay, 1 - step^decay_rate: it averages over more steps as it goes."""
    clip_threshold: float = 1.0
    """Clip each update's root mean square to this (Adafactor's own, besides ``max_grad_norm``)."""
    eps: list[float] = field(default_factory=lambda: [1e-30, 1e-3])
    """Regularizers of the squared gradient and of the parameter scale."""
    weight_decay: float = 0.0
    """Weight decay, scaled by the LR."""
    scale_parameter: bool = False
    """Scale the step by each weight's root mean square (Adafactor's relative scale); off: lr is the step."""
    UNSHARDABLE: ClassVar[str | None] = "its row and column means are of whole weights, not of DTensor shards"
    """Its first step on FSDP2's parameters fails (plain tensors next to DTensors); a shard's means differ."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            self.beta1 is None or 0 <= self.beta1 < 1, "optim.beta1", f"got {self.beta1}", "null or in [0, 1)"
        )
        _require(self.decay_rate < 0, "optim.decay_rate", f"got {self.decay_rate}", "below 0, e.g. -0.8")
        _require(self.clip_threshold > 0, "optim.clip_threshold", "must be > 0", "e.g. 1.0")
        _require(
            len(self.eps) == 2 and all(e > 0 for e in self.eps),
            "optim.eps",
            f"got {list(self.eps)}",
            "two values > 0, e.g. [1e-30,1e-3]",
        )
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", "e.g. 0.0")

    def state_bytes(self, shape: tuple[int, ...], dtype_bytes: int) -> int:
        n = math.prod(shape)
        # factored over the last two dimensions (a 3x3 conv kernel keeps 2/3 of a full one); a vector: whole
        second = math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1] if len(shape) >= 2 else n
        first = n if self.beta1 is not None else 0
        return (second + first) * dtype_bytes + 4  # and the weights' float32 root mean square


@dataclass
class ProdigyConfig(OptimBase):
    """``optim=prodigy``: prodigyopt's Prodigy, an Adam that estimates its own step size (``d``); four
    float32 numbers per parameter (the moments, the starting weights and a running sum)."""

    name: str = "prodigy"
    """The optimizer: Prodigy (prodigyopt)."""
    lr: float = 1.0
    """A multiplier of the step size Prodigy estimates, not a step size: usually 1.0 (0.5 for a gentler run);
    in [0.1, 10]. The schedule and warmup still apply to it."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Decay rates of the running averages of the gradient and of its square, as Adam's."""
    beta3: float | None = None
    """Decay of the step-size estimate's running sums; null: the square root of the second beta."""
    eps: float = 1e-8
    """Added to the denominator for numerical stability."""
    weight_decay: float = 0.0
    """Weight decay (decoupled, as AdamW's, with ``decouple``)."""
    decouple: bool = True
    """AdamW-style decoupled weight decay; false: L2 added to the gradient."""
    use_bias_correction: bool = False
    """Adam's bias correction of the moments, which slows the first steps."""
    safeguard_warmup: bool = False
    """Keep the LR warmup out of the step-size estimate (recommended with ``warmup_steps``)."""
    d0: float = 1e-6
    """The starting estimate of the step size; it only grows."""
    d_coef: float = 1.0
    """Multiplies the estimated step size: below 1 for a smaller step than Prodigy finds."""
    slice_p: int = 1
    """Estimate the step size from every slice_p-th element: the starting weights and running sum then
    take 1/slice_p of their memory (11 is the authors' suggestion for large models)."""

    REQUIRES: ClassVar[tuple[str, str] | None] = ("prodigyopt", "pip install prodigyopt")
    """prodigyopt is a dependency of sdcluster; an environment from before it was added lacks it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            0.1 <= self.lr <= 10,
            "optim.lr",
            f"got {self.lr} with optim=prodigy, whose lr multiplies the step size it estimates itself",
            "use optim.lr=1.0 (0.5 for a gentler run); a step size such as 1e-5 would never train",
        )
        _require(
            not self.scale_lr,
            "optim.scale_lr",
            "Prodigy estimates the step size for the batch it sees",
            "leave optim.scale_lr=false with optim=prodigy",
        )
        _check_betas(self.betas)
        _require(
            self.beta3 is None or 0 <= self.beta3 < 1, "optim.beta3", f"got {self.beta3}", "null or in [0, 1)"
        )
        _require(self.eps > 0, "optim.eps", "must be > 0", "e.g. 1e-8")
        _require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0", "e.g. 0.0")
        _require(self.d0 > 0, "optim.d0", "must be > 0", "e.g. 1e-6")
        _require(self.d_coef > 0, "optim.d_coef", "must be > 0", "e.g. 1.0")
        _require(self.slice_p >= 1, "optim.slice_p", "must be >= 1", "1 (every element) or e.g. 11")

    def sharding_problem(self) -> str | None:
        sliced = f"optim.slice_p={self.slice_p} gathers whole weights, then summed once per rank (use 1)"
        return sliced if self.slice_p > 1 else None

    def state_bytes(self, shape: tuple[int, ...], dtype_bytes: int) -> int:
        n = math.prod(shape)
        return (2 * n + 2 * math.ceil(n / self.slice_p)) * dtype_bytes  # exp_avg, exp_avg_sq; p0, s sliced


_LARGE = (4096, 4096)
"""The weight matrix :meth:`OptimBase.state_bytes_per_param` averages over."""

OPTIMIZERS: dict[str, type[OptimBase]] = OptimBase.OPTIONS
OPTIMIZERS.update(
    adamw=OptimConfig, adamw8bit=AdamW8bitConfig, adafactor=AdafactorConfig, prodigy=ProdigyConfig
)
"""``optim=NAME`` -> its schema; :data:`sdcluster.train.optimizers.OPTIMIZERS` builds each (a test keeps them
in step) and ``conf/optim/NAME.yaml`` selects it."""


def optim_schema(name: str) -> type[OptimBase]:
    """The schema of optimizer ``name``, or a :class:`ConfigError` listing the ones there are."""
    _choice(name, "optim.name", tuple(OPTIMIZERS))
    return OPTIMIZERS[name]
