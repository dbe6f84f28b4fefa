"""The ``optim`` group (``conf/optim/``): AdamW and its learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from sdcluster.config.checks import LR_SCHEDULES, Schema, _choice, _require


@dataclass
class OptimConfig(Schema):
    """AdamW and its learning-rate schedule."""

    name: str = "adamw"
    """The optimizer (the ``conf/optim/`` option); AdamW is the only one."""
    lr: float = 1e-4
    """Peak learning rate, before ``scale_lr``; the seed fine-tuned SD 1.4 with 1e-5."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's decay rates of its running averages of the gradient and of its square."""
    weight_decay: float = 1e-2
    """AdamW's decoupled weight decay: pulls weights toward 0 at every step, scaled by the LR."""
    eps: float = 1e-8
    """AdamW's epsilon, added to the denominator for numerical stability."""
    scale_lr: bool = False
    """Multiply lr by batch_size x grad_accum x world size, to keep the step per sample as the batch grows."""
    lr_schedule: str = "constant"
    """How the LR moves over max_steps; with the constant ones raising max_steps continues the same run."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to lr (``constant`` ignores it); 0 starts at full lr."""
    max_grad_norm: float = 1.0
    """Clip the gradients' global norm to this before each optimizer step; 0 disables clipping."""
    fused: bool | None = None
    """Use torch's fused AdamW (one kernel per step); null: fused wherever torch supports it."""

    STEPS_FREE_SCHEDULES: ClassVar[tuple[str, ...]] = ("constant", "constant_with_warmup")
    """Schedules whose LR does not depend on train.max_steps, which is then not part of the run's identity."""

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
