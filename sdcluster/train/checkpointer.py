"""Resume and save for one run folder: the training loop only calls :meth:`Checkpointer.load` and ``save``.

The checkpointer owns every decision about checkpoints: which folder to resume from (``train.resume``: the
newest complete one, none, or a given folder), whether it can be trusted (:mod:`~sdcluster.train.step_folders`
verifies it) and is compatible with this run's shape, loading it (a broken one is named and skipped for the
previous one), saving (collective, published atomically, then pruned), and setting an earlier run's files
aside when a run starts over at step 0.

Everything resume needs beyond what accelerate's ``save_state`` covers is stored without pickle: accelerate
would checkpoint registered objects (EMA, LR scheduler) as ``custom_checkpoint_N.pkl`` and load them with
``weights_only=False``, an unrestricted pickle. We keep the EMA weights in safetensors and the LR scheduler
and counters in JSON instead.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file, save_file

from sdcluster.config import Config, ConfigError
from sdcluster.identity import config_hash
from sdcluster.runtime import ownership
from sdcluster.runtime.distributed import rank0_decides
from sdcluster.train import step_folders

if TYPE_CHECKING:
    from sdcluster.train.trainer import Trainer

log = logging.getLogger("sdcluster")

EMA_FILE = "ema.safetensors"
STATE_FILE = "train_state.json"


def write_extra(
    folder: Path, param_names: list[str], ema: Any, lr_scheduler: Any, ema_file: bool = True
) -> dict[str, Any]:
    """Write EMA weights and scheduler state into a checkpoint folder being built; return meta extras.

    The EMA averages what the run trains (:mod:`sdcluster.train.method`): the denoiser, or only its adapters.
    ``ema_file=False``: the strategy keeps the EMA weights in its own (sharded) state; only its step is here.
    """
    extra: dict[str, Any] = {"lr": lr_scheduler.get_last_lr()[0]}
    if ema is not None:
        if ema_file:
            pairs = zip(param_names, ema.shadow_params, strict=True)
            tensors = {name: p.detach().cpu().contiguous() for name, p in pairs}
            save_file(tensors, str(folder / EMA_FILE))
        extra["ema_optimization_step"] = ema.optimization_step
    state = {"lr_scheduler": lr_scheduler.state_dict()}
    (folder / STATE_FILE).write_text(json.dumps(state, default=_jsonable))
    return extra


def _jsonable(value: Any) -> Any:
    return None if callable(value) else str(value)


def load_extra(
    folder: Path,
    meta: step_folders.CheckpointMeta,
    param_names: list[str],
    ema: Any,
    sched: Any,
    ema_file: bool = True,
) -> None:
    state = json.loads((folder / STATE_FILE).read_text())
    sched_state = state["lr_scheduler"]
    sched_state.pop("lr_lambdas", None)  # functions are rebuilt from the config, not stored
    sched.load_state_dict({**sched.state_dict(), **sched_state})
    if ema is None:
        return
    check_ema(folder, meta)
    if ema_file:  # else the strategy loaded the EMA weights with its own (sharded) state
        tensors = load_file(str(folder / EMA_FILE))
        for name, shadow in zip(param_names, ema.shadow_params, strict=True):
            shadow.data.copy_(tensors[name].to(shadow.device, shadow.dtype))
    ema.optimization_step = meta.extra["ema_optimization_step"]


def check_ema(folder: Path, meta: step_folders.CheckpointMeta) -> None:
    """Refuse to resume an EMA run from a checkpoint saved without one (by its manifest: EMA's step)."""
    if "ema_optimization_step" not in meta.extra:
        raise ConfigError(
            f"train.use_ema: {folder} was saved without EMA. Fix: resume with train.use_ema=false, "
            "or start a new run"
        )


def check_compatible(meta: step_folders.CheckpointMeta, cfg: Config, world_size: int, folder: Path) -> None:
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


def remapped_micro_step(meta: step_folders.CheckpointMeta, batch_size: int, world_size: int) -> int:
    """The micro-step of the new shape that starts at the first sample the old run had not consumed."""
    consumed = meta.micro_step * meta.batch_size * meta.world_size
    return math.ceil(consumed / (batch_size * world_size))


class Checkpointer:
    """Loads and saves the state of one :class:`~sdcluster.train.trainer.Trainer` in its run folder."""

    def __init__(self, trainer: Trainer, job_id: str | None) -> None:
        self.t = trainer
        self.job_id = job_id
        self.root = trainer.paths.checkpoints
        # (step, micro-step) where the current shape began: saved so each manifest can prove its micro-step
        self.origin = (0, 0)

    def _candidates(self) -> list[Path]:
        resume = self.t.cfg.train.resume
        if resume == "never":
            return []
        if resume == "auto":
            return step_folders.complete_checkpoints(self.root)
        return [step_folders.resume_folder(resume)]

    def load(self) -> None:
        """Continue from the newest checkpoint that loads (a broken one is named and skipped), or start at
        step 0 with an earlier run's files set aside."""
        t = self.t
        world = t.accelerator.num_processes
        candidates = self._candidates()
        for folder in candidates:
            problem = step_folders.verify(folder, content=True, named=t.cfg.train.resume == "auto")
            if problem:
                log.warning("could not load checkpoint %s (%s); trying an older one", folder, problem)
                continue
            meta = step_folders.read_meta(folder)
            check_compatible(meta, t.cfg, world, folder)
            if t.ema is not None:
                check_ema(folder, meta)
            try:
                t.accelerator.load_state(str(folder))
                t.strategy.load(t, folder)  # collective: what save_state does not hold (FSDP's shards)
                ema_file = not t.strategy.keeps_ema
                load_extra(folder, meta, t.param_names, t.ema, t.lr_scheduler, ema_file)
            except ConfigError:
                raise
            except Exception as err:  # any decoding error of any file: the next older checkpoint may be fine
                log.warning("could not load checkpoint %s (%s); trying an older one", folder, err)
                continue
            self._continue_from(folder, meta)
            return
        if candidates:  # never silently start over when there was state to continue from
            raise RuntimeError(
                f"none of the checkpoints in {self.root} could be loaded (see warnings above). "
                "Fix: inspect them, move the bad ones away, or set train.resume=never to start over"
            )
        log.info("no checkpoint to resume from in %s: starting at step 0", self.root)
        self._set_aside_previous_run()

    def _continue_from(self, folder: Path, meta: step_folders.CheckpointMeta) -> None:
        """Take the loaded checkpoint's step, micro-step and origin (a new one if the shape changed)."""
        t, cfg = self.t, self.t.cfg.train
        world = t.accelerator.num_processes
        t.step, t.micro_step = meta.step, meta.micro_step
        if (meta.world_size, meta.batch_size) != (world, cfg.batch_size):
            t.micro_step = remapped_micro_step(meta, cfg.batch_size, world)
        self.origin = (meta.origin_step, meta.origin_micro_step)
        if (meta.world_size, meta.batch_size, meta.grad_accum) != (world, cfg.batch_size, cfg.grad_accum):
            self.origin = (t.step, t.micro_step)
            # accelerate counts micro-steps since the run began and syncs where that count divides by the
            # accumulation: after a change of accumulation the first step would be cut short. Restart it.
            t.accelerator.step = 0
        if meta.format is None:  # no origin recorded: count from here
            self.origin = (t.step, t.micro_step)
            log.warning(
                "checkpoint %s has an older manifest without a digest: only its files and its folder name "
                "were checked; the next save writes the current format",
                folder,
            )
        log.info("resumed from %s at step %d (micro-step %d)", folder, t.step, t.micro_step)

    def _set_aside_previous_run(self) -> None:
        """Move what an earlier run left in this run folder to ``previous/<time>/`` before starting at step 0.

        A run starts over in its own folder with ``train.resume=never``, or when no checkpoint survived. Its
        metrics, validation images, tracker run, checkpoints, export and generated images would otherwise be
        mixed with the new run's (a stale final checkpoint would even stand in for the new one). Nothing is
        deleted: the warning says where it went.
        """
        acc, root = self.t.accelerator, self.t.paths.root
        if acc.is_main_process:
            keep = ("previous", ownership.OWNER)  # the holder of the folder stays: it is this job
            leftovers = sorted(p for p in root.iterdir() if p.name not in keep)
            if leftovers:
                dest = root / "previous" / time.strftime("%Y%m%dT%H%M%S")
                dest.mkdir(parents=True, exist_ok=True)
                for path in leftovers:
                    path.rename(dest / path.name)
                names = ", ".join(p.name for p in leftovers)
                log.warning("starting %s at step 0: moved an earlier run's %s to %s", root, names, dest)
        acc.wait_for_everyone()

    def save(self) -> Path:
        """Collective: every rank saves its part, rank 0 commits ``step-N`` and prunes."""
        t = self.t
        meta = step_folders.CheckpointMeta(
            step=t.step,
            micro_step=t.micro_step,
            config_hash=config_hash(t.cfg),
            world_size=t.accelerator.num_processes,
            batch_size=t.cfg.train.batch_size,
            grad_accum=t.cfg.train.grad_accum,
            job_id=self.job_id,
            origin_step=self.origin[0],
            origin_micro_step=self.origin[1],
        )
        return step_folders.save(
            t.accelerator,
            self.root,
            meta,
            lambda folder: write_extra(
                folder, t.param_names, t.ema, t.lr_scheduler, ema_file=not t.strategy.keeps_ema
            ),
            t.cfg.train.checkpoints_keep,
            write_shards=lambda folder: t.strategy.save(t, folder),
        )

    def save_unless_saved(self) -> None:
        """Save the current step unless its checkpoint exists (a rerun of a finished run); rank 0 decides,
        since ``save`` is collective."""
        saved = None
        if self.t.accelerator.is_main_process:
            newest = step_folders.complete_checkpoints(self.root, warn=False)
            saved = bool(newest) and step_folders.read_meta(newest[0]).step == self.t.step
        if not rank0_decides(self.t.accelerator, saved):
            self.save()
