"""What the training loop works on: the Accelerator, the models, EMA, optimizer and LR schedule, built once.

Kept apart from the loop (:mod:`sdcluster.train.loop`) so that validation, trackers and tests can take a
:class:`Trainer` without importing the loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from sdcluster.config import Config, ConfigError
from sdcluster.models.load import Components, load_components, prepare_frozen
from sdcluster.paths import RunPaths, run_paths
from sdcluster.train.method import Method, make_method, method_class, weight_dtype
from sdcluster.train.optimizers import make_optimizer
from sdcluster.train.strategy import DDP, Strategy, make_strategy

if TYPE_CHECKING:
    from accelerate import Accelerator

    from sdcluster.models.objectives import Objective
    from sdcluster.train.ema import LerpEMA

log = logging.getLogger("sdcluster")


@dataclass
class Trainer:
    """What the loop works on; built once by :func:`build_trainer`."""

    cfg: Config
    accelerator: Accelerator
    comps: Components
    denoiser: torch.nn.Module  # as the strategy prepared it (a DDP wrapper, or FSDP's sharded module)
    objective: Objective  # what the denoiser learns to predict (the family's)
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: LerpEMA | None
    param_names: list[str]  # of ``params``: the names of the EMA's tensors in a checkpoint
    paths: RunPaths
    method: Method  # what is trained, saved and exported (sdcluster.train.method)
    models: list[torch.nn.Module] = field(default_factory=list)  # prepared by accelerate: the denoiser first
    step: int = 0
    micro_step: int = 0
    params: list[torch.nn.Parameter] = field(default_factory=list)  # listed once: iterating is not free
    strategy: Strategy = field(default_factory=lambda: DDP(None))  # how the weights live on the ranks


def weights_checksum(model: torch.nn.Module | list[torch.nn.Parameter]) -> str:
    """A cheap fingerprint logged by every rank, so a log shows that replicas stayed identical."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    with torch.no_grad():
        total = sum(p.detach().double().abs().sum().item() for p in params)
    return f"{total:.10e}"


def _make_accelerator(cfg: Config, paths: RunPaths) -> Accelerator:
    from accelerate import Accelerator, DistributedDataParallelKwargs

    from sdcluster.train.tracking import accelerator_kwargs

    cuda = torch.cuda.is_available()
    if cfg.train.mixed_precision == "fp16" and not cuda:
        raise ConfigError("train.mixed_precision=fp16 needs a GPU. Fix: use no (or bf16) on CPU")
    if cuda and cfg.train.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    handlers = []
    if method_class(cfg).finds_unused_parameters(cfg):
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        cpu=not cuda,
        kwargs_handlers=handlers,
        **accelerator_kwargs(cfg, paths),
    )


def _prepare_models(cfg: Config, comps: Components, accelerator: Accelerator, method: Method) -> None:
    prepare_frozen(cfg.model, comps, accelerator.device, weight_dtype(accelerator))
    method.prepare(comps, accelerator)  # what is trained: the denoiser, or adapters (unfreezing nothing else)
    if cfg.train.gradient_checkpointing:
        comps.denoiser.enable_gradient_checkpointing()


def build_trainer(cfg: Config) -> Trainer:
    """Accelerator, models, EMA, optimizer and LR schedule for ``cfg``, at step 0 (resume comes next)."""
    from diffusers.optimization import get_scheduler

    paths = run_paths(cfg)
    accelerator = _make_accelerator(cfg, paths)
    comps = load_components(cfg.model, cfg.cache_root, accelerator)
    comps.family.refuse_settings(cfg.train)  # the launch checked it too: a library caller may not have
    method = make_method(cfg, comps.family)
    _prepare_models(cfg, comps, accelerator, method)
    # The family's objective applies train.prediction_type (to the noise scheduler, which the validation
    # sampler is built from): a family with another objective needs nothing here.
    objective = comps.family.objective(
        comps.noise_scheduler, cfg.train.prediction_type, flow=cfg.model.flow_matching
    )
    for model in method.models:
        model.to(accelerator.device)
    strategy = make_strategy(cfg)
    strategy.shard(method.models, accelerator)  # before the EMA and the optimizer take the parameters
    named = method.named_parameters()
    ema = None
    if cfg.train.use_ema:
        from sdcluster.train.ema import LerpEMA

        ema = LerpEMA(
            [p for _, p in named],  # what is trained: the denoiser's weights, or only the adapters
            decay=cfg.train.ema_decay,
            foreach=True,  # what store/copy_to/restore use; the update itself is LerpEMA's one fused lerp
            offload=cfg.train.ema_offload,
        )
    optimizer = make_optimizer(cfg, method, accelerator.num_processes, sharded=strategy.shards)
    # Not passed to accelerator.prepare: a prepared scheduler is stepped once per process, the multi-GPU
    # learning-rate bug users keep hitting. We step it once per optimizer step and checkpoint it as JSON.
    lr_scheduler = get_scheduler(
        cfg.optim.lr_schedule,
        optimizer=optimizer,
        num_warmup_steps=cfg.optim.warmup_steps,
        num_training_steps=cfg.train.max_steps,
    )
    method.register_checkpoint_hooks(accelerator)
    models, optimizer = strategy.prepare(accelerator, method.models, optimizer)
    method.prepared = models  # what forward passes go through (DDP averages gradients only through them)
    return Trainer(
        cfg,
        accelerator,
        comps,
        models[0],
        objective,
        optimizer,
        lr_scheduler,
        ema,
        [name for name, _ in named],
        paths,
        method,
        models=models,
        params=[p for _, p in named],
        strategy=strategy,
    )
