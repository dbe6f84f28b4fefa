"""The torch optimizer of a run: a builder per ``optim=NAME`` (:data:`OPTIMIZERS`), from the method's groups.

Each builder turns its schema (:mod:`sdcluster.config.optim`, which also says what its state costs) into the
library's optimizer, over the parameter groups the method gives (the denoiser's weights or the adapters, the
text encoder's adapters with their own rate). The loop, the LR schedule, gradient clipping and checkpoints
are the same for all of them: accelerate saves and loads each optimizer's ``state_dict`` (8-bit moments and
Prodigy's step-size estimate included), so a run resumes bit-exact whichever it uses.

Built from plain parameters, before ``accelerator.prepare``, as AdamW always was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from sdcluster.config import Config
    from sdcluster.config.optim import (
        AdafactorConfig,
        AdamW8bitConfig,
        OptimBase,
        OptimConfig,
        ProdigyConfig,
    )
    from sdcluster.train.method import Method

Groups = list[dict[str, Any]]


class Builder(Protocol):
    """Builds one kind of optimizer from its settings, the parameter groups and the (scaled) peak LR."""

    def build(self, cfg: Any, groups: Groups, lr: float) -> torch.optim.Optimizer: ...


class AdamW:
    """torch's AdamW, fused where torch has the kernel."""

    def build(self, cfg: OptimConfig, groups: Groups, lr: float) -> torch.optim.Optimizer:
        fused = cfg.fused
        if fused is None:  # fused AdamW is one kernel per step instead of one per parameter (3.6x on CPU)
            fused = groups[0]["params"][0].device.type in ("cuda", "cpu")
        return torch.optim.AdamW(
            groups,
            lr=lr,
            betas=tuple(cfg.betas),
            weight_decay=cfg.weight_decay,
            eps=cfg.eps,
            fused=fused,
        )


class AdamW8bit:
    """bitsandbytes' block-wise 8-bit AdamW: CUDA and CPU kernels, maintained, and its state is plain
    tensors in the ``state_dict`` (torchao's ``AdamW8bit`` compiles each step with ``torch.compile``, about
    half a minute per parameter shape on CPU, and keeps its state in tensor subclasses)."""

    def build(self, cfg: AdamW8bitConfig, groups: Groups, lr: float) -> torch.optim.Optimizer:
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(
            groups,
            lr=lr,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            min_8bit_size=cfg.min_8bit_size,
        )


class Adafactor:
    """transformers' Adafactor with an external learning rate, so ``optim.lr_schedule`` drives it as it
    drives the others (its relative step would replace the schedule)."""

    def build(self, cfg: AdafactorConfig, groups: Groups, lr: float) -> torch.optim.Optimizer:
        from transformers.optimization import Adafactor as Impl

        return Impl(
            groups,
            lr=lr,
            eps=tuple(cfg.eps),
            clip_threshold=cfg.clip_threshold,
            decay_rate=cfg.decay_rate,
            beta1=cfg.beta1,
            weight_decay=cfg.weight_decay,
            scale_parameter=cfg.scale_parameter,
            relative_step=False,
            warmup_init=False,
        )


class Prodigy:
    """prodigyopt's Prodigy; its step-size estimate lives in the param groups, which the ``state_dict``
    keeps, so a resumed run continues with the estimate it had."""

    def build(self, cfg: ProdigyConfig, groups: Groups, lr: float) -> torch.optim.Optimizer:
        from prodigyopt import Prodigy as Impl

        return Impl(
            groups,
            lr=lr,
            betas=tuple(cfg.betas),
            beta3=cfg.beta3,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            decouple=cfg.decouple,
            use_bias_correction=cfg.use_bias_correction,
            safeguard_warmup=cfg.safeguard_warmup,
            d0=cfg.d0,
            d_coef=cfg.d_coef,
            slice_p=cfg.slice_p,
        )


OPTIMIZERS: dict[str, Builder] = {
    "adamw": AdamW(),
    "adamw8bit": AdamW8bit(),
    "adafactor": Adafactor(),
    "prodigy": Prodigy(),
}
"""``optim.name`` -> its builder: the schemas' :data:`sdcluster.config.optim.OPTIMIZERS` (a test keeps them in
step)."""


def peak_lr(cfg: Config, world_size: int) -> float:
    """``optim.lr``, times the samples per optimizer step with ``optim.scale_lr``."""
    lr = cfg.optim.lr
    if cfg.optim.scale_lr:
        lr *= cfg.train.batch_size * cfg.train.grad_accum * world_size
    return lr


def build_optimizer(optim: OptimBase, groups: Groups, lr: float) -> torch.optim.Optimizer:
    """The optimizer ``optim`` names, over ``groups`` (each with its own ``lr``), ``lr`` its default."""
    return OPTIMIZERS[optim.name].build(optim, groups, lr)


def make_optimizer(cfg: Config, method: Method, world_size: int) -> torch.optim.Optimizer:
    """The run's optimizer over what ``method`` trains (its param groups), at the peak learning rate."""
    lr = peak_lr(cfg, world_size)
    return build_optimizer(cfg.optim, method.param_groups(lr), lr)
