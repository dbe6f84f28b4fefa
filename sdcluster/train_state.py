"""Everything resume needs beyond what accelerate's ``save_state`` covers, stored without pickle.

accelerate would checkpoint registered objects (EMA, LR scheduler) as ``custom_checkpoint_N.pkl`` and load
them with ``weights_only=False``, an unrestricted pickle. We keep the EMA weights in safetensors and the LR
scheduler and counters in JSON instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from sdcluster import checkpoint
from sdcluster.config import Config, ConfigError

EMA_FILE = "ema.safetensors"
STATE_FILE = "train_state.json"


def write_extra(folder: Path, unet_names: list[str], ema: Any, lr_scheduler: Any) -> dict[str, Any]:
    """Write EMA weights and scheduler state into a checkpoint folder being built; return meta extras."""
    extra: dict[str, Any] = {"lr": lr_scheduler.get_last_lr()[0]}
    if ema is not None:
        pairs = zip(unet_names, ema.shadow_params, strict=True)
        tensors = {name: p.detach().cpu().contiguous() for name, p in pairs}
        save_file(tensors, str(folder / EMA_FILE))
        extra["ema_optimization_step"] = ema.optimization_step
    state = {"lr_scheduler": lr_scheduler.state_dict()}
    (folder / STATE_FILE).write_text(json.dumps(state, default=_jsonable))
    return extra


def _jsonable(value: Any) -> Any:
    return None if callable(value) else str(value)


def load_extra(folder: Path, meta: checkpoint.CheckpointMeta, unet_names: list[str], ema: Any, sched: Any):
    state = json.loads((folder / STATE_FILE).read_text())
    sched_state = state["lr_scheduler"]
    sched_state.pop("lr_lambdas", None)  # functions are rebuilt from the config, not stored
    sched.load_state_dict({**sched.state_dict(), **sched_state})
    if ema is not None:
        if not (folder / EMA_FILE).is_file():
            raise ConfigError(
                f"train.use_ema: {folder} was saved without EMA. Fix: resume with train.use_ema=false, "
                "or start a new run"
            )
        tensors = load_file(str(folder / EMA_FILE))
        for name, shadow in zip(unet_names, ema.shadow_params, strict=True):
            shadow.data.copy_(tensors[name].to(shadow.device, shadow.dtype))
        ema.optimization_step = meta.extra["ema_optimization_step"]


def check_compatible(meta: checkpoint.CheckpointMeta, cfg: Config, world_size: int, folder: Path) -> None:
    """Refuse a resume that would silently change what the data position means."""
    changes = []
    if meta.world_size != world_size:
        changes.append(f"world size {meta.world_size} -> {world_size}")
    if meta.batch_size != cfg.train.batch_size:
        changes.append(f"train.batch_size {meta.batch_size} -> {cfg.train.batch_size}")
    if meta.grad_accum != cfg.train.grad_accum:
        changes.append(f"train.grad_accum {meta.grad_accum} -> {cfg.train.grad_accum}")
    if changes and not cfg.train.allow_resume_change:
        raise ConfigError(
            f"resume from {folder}: {', '.join(changes)}. The effective batch and data order would change. "
            "Fix: resume with the original settings, or set train.allow_resume_change=true to remap the "
            "data position (samples already seen are not repeated)"
        )


def remapped_micro_step(meta: checkpoint.CheckpointMeta, batch_size: int, world_size: int) -> int:
    """The micro-step of the new shape that starts at the first sample the old run had not consumed."""
    consumed = meta.micro_step * meta.batch_size * meta.world_size
    return math.ceil(consumed / (batch_size * world_size))
