"""The torch optimizer of a run: a builder per ``optim=NAME`` (:data:`OPTIMIZERS`), from the method's groups.

Each builder turns its schema (:mod:`sdcluster.config.optim`, which also says what its state costs) into the
library's optimizer, over the parameter groups the method gives (the denoiser's weights or the adapters, the
text encoder's adapters with their own rate). The loop, the LR schedule, gradient clipping and checkpoints
are the same for all of them: accelerate saves and loads each optimizer's ``state_dict`` (8-bit moments and
Prodigy's step-size estimate included), so a run resumes bit-exact whichever it uses.

Built before ``accelerator.prepare``, from plain parameters, or from FSDP's sharded ones (``sharded``: each
rank steps its shard; an optimizer that cannot is refused on the login node, see
:func:`sdcluster.config.check_sharding`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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
    """Builds one kind of optimizer from its settings, the parameter groups and the (scaled) peak LR;
    ``sharded``: the parameters are FSDP's shards, each rank holding a part of every tensor."""

    def build(self, cfg: Any, groups: Groups, lr: float, sharded: bool = False) -> torch.optim.Optimizer: ...


class AdamW:
    """torch's AdamW, fused where torch has the kernel; element-wise, so a shard's step is the whole's."""

    def build(
        self, cfg: OptimConfig, groups: Groups, lr: float, sharded: bool = False
    ) -> torch.optim.Optimizer:
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

    def build(
        self, cfg: AdamW8bitConfig, groups: Groups, lr: float, sharded: bool = False
    ) -> torch.optim.Optimizer:
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

    def build(
        self, cfg: AdafactorConfig, groups: Groups, lr: float, sharded: bool = False
    ) -> torch.optim.Optimizer:
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
    keeps, so a resumed run continues with the estimate it had.

    Sharded, its estimate is two sums over every element of every parameter, and each rank sees only its
    shards: ``fsdp_in_use`` all-reduces the sums, so every rank takes the step size of the whole model (else
    each its own, and the ranks drift apart).
    """

    def build(
        self, cfg: ProdigyConfig, groups: Groups, lr: float, sharded: bool = False
    ) -> torch.optim.Optimizer:
        from prodigyopt import Prodigy as Impl

        return (_sharded_prodigy(Impl) if sharded else Impl)(
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
            fsdp_in_use=sharded,
        )


def _sharded_prodigy(impl: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """prodigyopt's Prodigy (1.1.2) with ``fsdp_in_use``, less two faults of that path.

    - A step at learning rate 0 (torch's checkpoint loader makes one to create the state it loads into;
      a warmup's first step) reads sums it never made, an ``UnboundLocalError``: such a step moves nothing
      and estimates nothing, so it runs without ``fsdp_in_use`` and returns before the all-reduce, as an
      unsharded one does (every rank has the same rates: none waits for the others).
    - It moves the two sums it all-reduces to the GPU with ``.cuda()``, which fails on a CPU process (gloo
      reduces CPU tensors): on a process without CUDA, ``Tensor.cuda`` leaves a tensor where it is during
      the step (nothing else could have called it successfully there).
    - The all-reduced sums leave its step-size estimate (``d``, ``d_numerator``, ...) as 0-dim tensors in the
      param groups, where a fresh optimizer has floats: DCP would refuse to load one into the other, so they
      are floats again after each step, as unsharded.
    """

    class Sharded(impl):  # type: ignore[misc,valid-type]
        def step(self, closure: Callable[[], float] | None = None) -> Any:
            moves = any(group["lr"] > 0 for group in self.param_groups)
            for group in self.param_groups:
                group["fsdp_in_use"] = moves
            try:
                with contextlib.nullcontext() if torch.cuda.is_available() else _cuda_is_identity():
                    return super().step(closure)
            finally:
                for group in self.param_groups:
                    group["fsdp_in_use"] = True
                    for key, value in group.items():
                        if key != "params" and isinstance(value, torch.Tensor):
                            group[key] = value.item()

    return Sharded


@contextlib.contextmanager
def _cuda_is_identity() -> Iterator[None]:
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda  # type: ignore[method-assign]


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


def build_optimizer(
    optim: OptimBase, groups: Groups, lr: float, sharded: bool = False
) -> torch.optim.Optimizer:
    """The optimizer ``optim`` names, over ``groups`` (each with its own ``lr``), ``lr`` its default;
    ``sharded``: over FSDP's shards (the strategy's :attr:`~sdcluster.train.strategy.Strategy.shards`)."""
    return OPTIMIZERS[optim.name].build(optim, groups, lr, sharded)


def make_optimizer(
    cfg: Config, method: Method, world_size: int, sharded: bool = False
) -> torch.optim.Optimizer:
    """The run's optimizer over what ``method`` trains (its param groups), at the peak learning rate."""
    lr = peak_lr(cfg, world_size)
    return build_optimizer(cfg.optim, method.param_groups(lr), lr, sharded)
