"""What the training loop works on: the Accelerator, the models, EMA, optimizer and LR schedule, built once.

Kept apart from the loop (:mod:`sdcluster.train.loop`) so that validation, trackers and tests can take a
:class:`Trainer` without importing the loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from sdcluster.config import Config, ConfigError
from sdcluster.models.load import Components, load_components
from sdcluster.paths import RunPaths, run_paths

log = logging.getLogger("sdcluster")


@dataclass
class Trainer:
    """What the loop works on; built once by :func:`build_trainer`."""

    cfg: Config
    accelerator: Any
    comps: Components
    unet: Any
    optimizer: Any
    lr_scheduler: Any
    ema: Any
    unet_names: list[str]
    paths: RunPaths
    step: int = 0
    micro_step: int = 0
    params: list[torch.nn.Parameter] = field(default_factory=list)  # listed once: iterating is not free


def weights_checksum(model: torch.nn.Module) -> str:
    """A cheap fingerprint logged by every rank, so a log shows that replicas stayed identical."""
    with torch.no_grad():
        total = sum(p.detach().double().abs().sum().item() for p in model.parameters())
    return f"{total:.10e}"


def _make_accelerator(cfg: Config, paths: RunPaths) -> Any:
    from accelerate import Accelerator

    from sdcluster.train.tracking import accelerator_kwargs

    cuda = torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and not cuda:
        raise ConfigError("train.mixed_precision=fp16 needs a GPU. Fix: use no (or bf16) on CPU")
    if cuda and cfg.train.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        cpu=not cuda,
        **accelerator_kwargs(cfg, paths),
    )


def _make_optimizer(cfg: Config, params: list[torch.nn.Parameter], world_size: int) -> Any:
    lr = cfg.optim.lr
    if cfg.optim.scale_lr:
        lr *= cfg.train.batch_size * cfg.train.grad_accum * world_size
    fused = cfg.optim.fused
    if fused is None:  # fused AdamW is one kernel per step instead of one per parameter (3.6x on CPU)
        fused = params[0].device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        params,
        lr=lr,
        betas=tuple(cfg.optim.betas),
        weight_decay=cfg.optim.weight_decay,
        eps=cfg.optim.eps,
        fused=fused,
    )


def _prepare_models(cfg: Config, comps: Components, accelerator: Any) -> None:
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision)
    for frozen in (comps.vae, comps.text_encoder):
        frozen.requires_grad_(False)
        frozen.eval()
        # Only cast when mixed precision asks for it: a no-op cast still trips diffusers' fp32-module warning.
        frozen.to(accelerator.device, dtype=weight_dtype) if weight_dtype else frozen.to(accelerator.device)
    comps.unet.train()
    if cfg.train.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    if cfg.train.prediction_type:
        comps.noise_scheduler.register_to_config(prediction_type=cfg.train.prediction_type)


def build_trainer(cfg: Config) -> Trainer:
    """Accelerator, models, EMA, optimizer and LR schedule for ``cfg``, at step 0 (resume comes next)."""
    from diffusers.optimization import get_scheduler

    paths = run_paths(cfg)
    accelerator = _make_accelerator(cfg, paths)
    comps = load_components(cfg.model, cfg.cache_root, accelerator)
    _prepare_models(cfg, comps, accelerator)
    unet = comps.unet.to(accelerator.device)
    names = [name for name, _ in unet.named_parameters()]
    ema = None
    if cfg.train.use_ema:
        from sdcluster.train.ema import LerpEMA

        ema = LerpEMA(
            unet.parameters(),
            decay=cfg.train.ema_decay,
            foreach=True,  # what store/copy_to/restore use; the update itself is LerpEMA's one fused lerp
            model_cls=type(unet),
            model_config=unet.config,
        )
    optimizer = _make_optimizer(cfg, list(unet.parameters()), accelerator.num_processes)
    # Not passed to accelerator.prepare: a prepared scheduler is stepped once per process, the multi-GPU
    # learning-rate bug users keep hitting. We step it once per optimizer step and checkpoint it as JSON.
    lr_scheduler = get_scheduler(
        cfg.optim.lr_schedule,
        optimizer=optimizer,
        num_warmup_steps=cfg.optim.warmup_steps,
        num_training_steps=cfg.train.max_steps,
    )
    unet, optimizer = accelerator.prepare(unet, optimizer)
    return Trainer(
        cfg,
        accelerator,
        comps,
        unet,
        optimizer,
        lr_scheduler,
        ema,
        names,
        paths,
        params=list(unet.parameters()),
    )
