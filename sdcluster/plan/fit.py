"""The memory plan of a config, checked against ``cluster.gpu_mem_gb`` before anything is queued.

:func:`plan_config` reads the settings memory depends on from a config and plans them
(:mod:`sdcluster.plan.budget`); :func:`check_fits` refuses a plan above ``cluster.gpu_mem_gb`` with the
parts and the cheapest change that fits. Each candidate change is applied to the config itself (so the
schema's own checks refuse one that cannot be combined with the rest, e.g. FSDP with LoRA) and planned again:
a suggestion is a plan that was computed to fit, not a rule of thumb. Candidates, cheapest first (what each
costs the user): gradient checkpointing (some compute), EMA offload (copies over the bus), a leaner
optimizer (slightly different steps), a sharded strategy on the same GPUs (communication), with CPU offload
(slower steps), on more GPUs (more of the cluster), LoRA (trains something else). When no single change
fits, they are combined in that order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sdcluster.config import Config, ConfigError, check_config
from sdcluster.config.optim import OPTIMIZERS
from sdcluster.config.train import TRAIN_STRATEGIES
from sdcluster.plan.budget import FP32, GIB, Plan, Setup, plan
from sdcluster.plan.sizes import ModelSizes, model_folder, model_sizes, with_adapters

MORE_GPUS = (2, 4, 8)
"""GPUs per node tried for a sharded strategy before more nodes (8 is the usual most a node has)."""
MAX_NODES = 64


def trained_shapes(cfg: Config, sizes: ModelSizes) -> tuple[tuple[int, ...], ...]:
    """The shapes of the tensors ``cfg`` trains: the adapters, or every denoiser parameter."""
    return sizes.adapter_shapes if cfg.train.trains_adapters else sizes.denoiser_shapes


def setup_of(cfg: Config, sizes: ModelSizes) -> Setup:
    """The settings of ``cfg`` that one GPU's memory depends on."""
    train = cfg.train
    return Setup(
        sizes=sizes,
        trains_adapters=train.trains_adapters,
        shards=train.shards,
        offload=train.fsdp_offload,
        processes=cfg.cluster.world_size,
        optimizer_state=sum(cfg.optim.state_bytes(shape, FP32) for shape in trained_shapes(cfg, sizes)),
        half=train.mixed_precision != "no",
        ema=train.use_ema,
        ema_offload=train.ema_offload,
        checkpointing=train.gradient_checkpointing,
        resolution=train.resolution,
        batch=train.batch_size,
        accumulation=train.grad_accum > 1,
        # the text encoders trained (LoRA on them) run at every step: the cache's text arrays go unused
        text_cached=cfg.data.cache and not (train.trains_adapters and train.lora.text_encoder_lr is not None),
        builds_cache=cfg.data.cache_shards <= 1,
    )


@dataclass(frozen=True)
class Planned:
    """A config's plan, with what it needs to plan a change of it again."""

    cfg: Config
    plan: Plan
    folder: Path
    sizes: ModelSizes

    def again(self, cfg: Config) -> Plan:
        """The plan of ``cfg``, a change of :attr:`cfg` (adapters counted when it newly trains them)."""
        sizes = self.sizes
        if cfg.train.trains_adapters and (
            not self.cfg.train.trains_adapters or cfg.train.lora != self.cfg.train.lora
        ):
            sizes = with_adapters(sizes, cfg, self.folder)
        return plan(setup_of(cfg, sizes))


def plan_config(cfg: Config) -> Planned | None:
    """The plan of ``cfg``'s training job, or None when the model's configs are not on this machine."""
    folder = model_folder(cfg)
    if folder is None:
        return None
    sizes = model_sizes(cfg, folder)
    return Planned(cfg, plan(setup_of(cfg, sizes)), folder, sizes)


Change = tuple[str, Callable[[Config], Config]]


def _train(**keys: object) -> Callable[[Config], Config]:
    return lambda cfg: dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **keys))


def _cluster(**keys: object) -> Callable[[Config], Config]:
    return lambda cfg: dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, **keys))


def _both(*changes: Callable[[Config], Config]) -> Callable[[Config], Config]:
    def apply(cfg: Config) -> Config:
        for change in changes:
            cfg = change(cfg)
        return cfg

    return apply


def _leaner_optimizers(cfg: Config) -> Iterator[Change]:
    """Optimizers with less state per parameter than ``cfg``'s, the closest to it first."""
    own = cfg.optim.state_bytes_per_param(FP32)
    leaner = []
    for name, schema in OPTIMIZERS.items():
        try:
            other = schema(lr=cfg.optim.lr)
        except ConfigError:  # not usable here (its package is missing, or this lr is not one for it)
            continue
        if other.state_bytes_per_param(FP32) < own:
            leaner.append((other.state_bytes_per_param(FP32), name, other))
    for _, name, other in sorted(leaner, key=lambda x: -x[0]):
        yield f"optim={name}", lambda c, o=other: dataclasses.replace(c, optim=o)


def _sharded(cfg: Config) -> Iterator[Change]:
    """A sharded strategy: on the job's GPUs, with CPU offload, then on more GPUs (or nodes)."""
    name = next((n for n, shards in TRAIN_STRATEGIES.items() if shards), None)
    if name is None or cfg.train.shards:
        if cfg.train.shards and not cfg.train.fsdp_offload:
            yield "train.fsdp_offload=true", _train(fsdp_offload=True)
        return
    shard = _train(strategy=name)
    yield f"train.strategy={name}", shard
    yield f"train.strategy={name} train.fsdp_offload=true", _train(strategy=name, fsdp_offload=True)
    yield from _more_processes(cfg, f"train.strategy={name}", shard)


def _more_processes(cfg: Config, label: str, shard: Callable[[Config], Config]) -> Iterator[Change]:
    c = cfg.cluster
    per_node = c.processes_per_node
    if c.gpus_per_node > 0:
        for gpus in (g for g in MORE_GPUS if g > c.gpus_per_node):
            yield (
                f"{label} cluster.gpus_per_node={gpus} ({gpus * c.nodes} GPUs)",
                _both(shard, _cluster(gpus_per_node=gpus)),
            )
        per_node = max(c.gpus_per_node, MORE_GPUS[-1])
    key = "gpus_per_node" if c.gpus_per_node > 0 else "tasks_per_node"
    nodes = c.nodes + 1
    while nodes <= MAX_NODES:
        yield (
            f"{label} cluster.nodes={nodes} cluster.{key}={per_node} ({nodes * per_node} processes)",
            _both(shard, _cluster(nodes=nodes, **{key: per_node})),
        )
        nodes *= 2


def candidates(cfg: Config) -> Iterator[Change]:
    """Every change that lowers one GPU's memory, cheapest first (see the module docstring)."""
    train = cfg.train
    if not train.gradient_checkpointing:
        yield "train.gradient_checkpointing=true", _train(gradient_checkpointing=True)
    if train.use_ema and not train.ema_offload:
        yield "train.ema_offload=true", _train(ema_offload=True)
    yield from _leaner_optimizers(cfg)
    yield from _sharded(cfg)
    if not train.trains_adapters:
        lora = next(name for name, block in _methods().items() if block is not None)
        yield f"train.method={lora}", _train(method=lora)


def _methods() -> dict[str, str | None]:
    from sdcluster.config.checks import TRAIN_METHODS

    return TRAIN_METHODS


def _fits(planned: Planned, cfg: Config, budget: int) -> Plan | None:
    try:
        check_config(cfg)  # the launch's checks across groups: a change it would refuse is no fix
        new = planned.again(cfg)
    except ConfigError:  # a change the schema refuses with the rest of this config
        return None
    return new if new.peak <= budget else None


def cheapest_fit(planned: Planned, budget: int) -> tuple[str, Plan] | None:
    """The cheapest change (or, when none alone fits, combination of changes) whose plan fits ``budget``."""
    changes = list(candidates(planned.cfg))
    for label, change in changes:
        fitted = _fits(planned, _safe(change, planned.cfg), budget)
        if fitted:
            return label, fitted
    cfg, labels = planned.cfg, []
    for label, change in changes:  # combined, each kept while the schema accepts it
        changed = _safe(change, cfg)
        if changed is cfg:
            continue
        cfg, labels = changed, [*labels, label]
        fitted = _fits(planned, cfg, budget)
        if fitted:
            return " ".join(labels), fitted
    return None


def _safe(change: Callable[[Config], Config], cfg: Config) -> Config:
    """``change(cfg)``, or ``cfg`` itself when the schema refuses the change with this config."""
    try:
        return change(cfg)
    except ConfigError:
        return cfg


def describe(planned: Planned) -> list[str]:
    """The plan as the dry run and ``python -m sdcluster.plan`` print it."""
    cfg = planned.cfg
    head = (
        f"memory plan per GPU: {cfg.model.name}, train.method={cfg.train.method}, "
        f"train.strategy={cfg.train.strategy} on {cfg.cluster.world_size} process(es), "
        f"optim={cfg.optim.name}, batch {cfg.train.batch_size} at {cfg.train.resolution} px"
    )
    return [head, *planned.plan.table(cfg.cluster.gpu_mem_gb)]


def check_fits(cfg: Config) -> list[str]:
    """Refuse a training job whose plan is above ``cluster.gpu_mem_gb``, naming the parts and the cheapest
    change that fits (a :class:`ConfigError`). Returns what could not be checked (a hub model a dry run did
    not stage has no configs here); nothing is planned, and torch is not imported, without a budget."""
    if cfg.cluster.gpu_mem_gb is None or not cfg.trains:
        return []
    planned = plan_config(cfg)
    if planned is None:
        return [f"the memory plan (the configs of {cfg.model.path} are not staged on this machine)"]
    refuse_above_budget(planned)
    return []


def refuse_above_budget(planned: Planned) -> None:
    """The :class:`ConfigError` of :func:`check_fits` for a plan above ``cluster.gpu_mem_gb``."""
    cfg = planned.cfg
    if cfg.cluster.gpu_mem_gb is None:
        return
    budget = math.floor(cfg.cluster.gpu_mem_gb * GIB)
    if planned.plan.peak <= budget:
        return
    lines = "\n".join(describe(planned))
    fit = cheapest_fit(planned, budget)
    if fit is None:
        fix = "no change sdcluster knows fits it: use GPUs with more memory (e.g. cluster.constraint)"
    else:
        label, fitted = fit
        fix = f"{label} (planned at {fitted.peak / GIB:.2f} GiB per GPU)"
    raise ConfigError(
        f"cluster.gpu_mem_gb: the training job needs {planned.plan.peak / GIB:.2f} GiB per GPU, above "
        f"the {cfg.cluster.gpu_mem_gb} GiB of cluster.gpu_mem_gb:\n{lines}\nFix: {fix}"
    )
