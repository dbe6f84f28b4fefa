"""The fine-tuning job: accelerate-driven UNet training that resumes by default and stops at step boundaries.

Every rank runs this same function. Run on CPU (tiny model), one GPU, or N processes under SLURM; the
difference is only the environment :mod:`sdcluster.distributed` exported before the Accelerator exists.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdcluster import checkpoint, metrics, tracking, train_state
from sdcluster.config import Config, ConfigError
from sdcluster.distributed import rank0_decides
from sdcluster.loss import diffusion_loss, model_inputs, step_generator
from sdcluster.paths import RunPaths, semantic_train_config, stable_hash
from sdcluster.preemption import PreemptionFlag
from sdcluster.progress import ProgressLog
from sdcluster.trainer import Trainer, build_trainer, weights_checksum

log = logging.getLogger("sdcluster")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    interrupted: bool
    model_dir: Path | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)


def config_hash(cfg: Config) -> str:
    return stable_hash(semantic_train_config(cfg), length=16)


def _candidates(cfg: Config, paths: RunPaths) -> list[Path]:
    if cfg.train.resume == "never":
        return []
    if cfg.train.resume == "auto":
        return checkpoint.complete_checkpoints(paths.checkpoints)
    folder = Path(cfg.train.resume).expanduser()
    problem = checkpoint.verify(folder) if folder.is_dir() else "does not exist"
    if problem:
        raise ConfigError(f"train.resume: {folder} {problem}. Fix: use train.resume=auto or a step-* folder")
    return [folder]


def _resume(t: Trainer) -> None:
    """Continue from the newest checkpoint that loads; a broken one is named and skipped."""
    world = t.accelerator.num_processes
    candidates = _candidates(t.cfg, t.paths)
    for folder in candidates:
        meta = checkpoint.read_meta(folder)
        train_state.check_compatible(meta, t.cfg, world, folder)
        try:
            t.accelerator.load_state(str(folder))
            train_state.load_extra(folder, meta, t.unet_names, t.ema, t.lr_scheduler)
        except ConfigError:
            raise
        except Exception as err:  # any decoding error of any file: the next older checkpoint may be fine
            log.warning("could not load checkpoint %s (%s); trying an older one", folder, err)
            continue
        t.step = meta.step
        t.micro_step = meta.micro_step
        if (meta.world_size, meta.batch_size) != (world, t.cfg.train.batch_size):
            t.micro_step = train_state.remapped_micro_step(meta, t.cfg.train.batch_size, world)
        log.info("resumed from %s at step %d (micro-step %d)", folder, t.step, t.micro_step)
        return
    if candidates:  # never silently start over when there was state to continue from
        raise RuntimeError(
            f"none of the checkpoints in {t.paths.checkpoints} could be loaded (see warnings above). "
            "Fix: inspect them, move the bad ones away, or set train.resume=never to start over"
        )
    log.info("no checkpoint to resume from in %s: starting at step 0", t.paths.checkpoints)


def _set_aside_previous_run(t: Trainer) -> None:
    """Move what an earlier run left in this run folder to ``previous/<time>/`` before starting at step 0.

    A run starts over in its own folder with ``train.resume=never``, or when no checkpoint survived. Its
    metrics, validation images, tracker run, checkpoints, export and generated images would otherwise be
    mixed with the new run's (a stale final checkpoint would even stand in for the new one). Nothing is
    deleted: the warning says where it went.
    """
    acc = t.accelerator
    if acc.is_main_process:
        root = t.paths.root
        leftovers = sorted(p for p in root.iterdir() if p.name != "previous")
        if leftovers:
            dest = root / "previous" / time.strftime("%Y%m%dT%H%M%S")
            dest.mkdir(parents=True, exist_ok=True)
            for path in leftovers:
                path.rename(dest / path.name)
            log.warning(
                "starting %s at step 0: moved an earlier run's %s to %s",
                root,
                ", ".join(p.name for p in leftovers),
                dest,
            )
    acc.wait_for_everyone()


def _loader(t: Trainer) -> Any:
    from sdcluster.train_data import make_loader

    return make_loader(t.cfg, t.comps, t.accelerator, t.micro_step)


def _micro_step(t: Trainer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    cfg, acc = t.cfg, t.accelerator
    gen = step_generator(cfg.train.seed, t.micro_step, acc.process_index)
    with acc.accumulate(t.unet):
        latents, hidden = model_inputs(t.comps.vae, t.comps.text_encoder, batch, acc.device, gen)
        with acc.autocast():
            loss = diffusion_loss(
                t.unet,
                t.comps.noise_scheduler,
                latents,
                hidden,
                gen,
                cfg.train.noise_offset,
                cfg.train.snr_gamma,
            )
        acc.backward(loss)
        if acc.sync_gradients and cfg.optim.max_grad_norm > 0:
            acc.clip_grad_norm_(t.params, cfg.optim.max_grad_norm)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
    t.micro_step += 1
    return loss.detach()


def save_checkpoint(t: Trainer, job_id: str | None) -> Path:
    meta = checkpoint.CheckpointMeta(
        step=t.step,
        micro_step=t.micro_step,
        config_hash=config_hash(t.cfg),
        world_size=t.accelerator.num_processes,
        batch_size=t.cfg.train.batch_size,
        grad_accum=t.cfg.train.grad_accum,
        job_id=job_id,
    )
    return checkpoint.save(
        t.accelerator,
        t.paths.checkpoints,
        meta,
        lambda folder: train_state.write_extra(folder, t.unet_names, t.ema, t.lr_scheduler),
        t.cfg.train.checkpoints_keep,
    )


def _log_step(t: Trainer, progress: ProgressLog, loss_sum: torch.Tensor, count: int) -> float:
    """Reduce the window's mean loss across ranks: the only host sync, once per ``log_every`` steps."""
    mean = t.accelerator.reduce(loss_sum / max(count, 1), reduction="mean").item()
    lr = t.lr_scheduler.get_last_lr()[0]
    tracking.log(t.accelerator, t.cfg, {"loss": mean, "lr": lr}, t.step)
    if t.accelerator.is_main_process:
        progress.report(t.step, loss=mean, lr=lr)
        metrics.append(t.paths.metrics, {"step": t.step, "loss": mean, "lr": lr, "time": time.time()})
    return mean


def _validation_due(t: Trainer) -> bool:
    every = t.cfg.train.validate_every
    return bool(every) and t.step % every == 0 and 0 < t.step < t.cfg.train.max_steps


def _validate(t: Trainer) -> None:
    """Held-out loss and validation images at ``t.step``; collective, and it leaves every RNG alone.

    Skips a step whose ``val_loss`` is already in metrics.jsonl: a job preempted right at a validation step
    validates it after the resume (the save comes first, so the grace period goes to the checkpoint), a job
    resumed from an older checkpoint after a crash does not validate a step twice, and a rerun of a finished
    run does not redo the final validation. Rank 0 reads the file and tells the others.
    """
    from sdcluster.validation import run_validation

    acc = t.accelerator
    done = t.step in metrics.validated_steps(t.paths.metrics) if acc.is_main_process else None
    if rank0_decides(acc, done):
        return
    record = run_validation(t, t.step)
    tracking.log(t.accelerator, t.cfg, {"val_loss": record["val_loss"]}, t.step)
    if record["images"] is not None:
        tracking.log_image(t.accelerator, t.cfg, "validation", record["images"] / "grid.png", t.step)


def _loop(t: Trainer, flag: PreemptionFlag, stop_at: Callable[[int], bool] | None, job_id: str | None):
    cfg, acc = t.cfg, t.accelerator
    progress = ProgressLog(cfg.train.max_steps, "step", start=t.step)
    losses: list[tuple[int, float]] = []
    loss_sum, count = torch.zeros((), device=acc.device), 0
    if _validation_due(t):  # resumed at a validation step the preempted job saved before validating
        _validate(t)
    batches = iter(_loader(t))
    while t.step < cfg.train.max_steps:
        loss_sum += _micro_step(t, next(batches))
        count += 1
        if not acc.sync_gradients:
            continue
        t.step += 1
        t.lr_scheduler.step()
        if t.ema is not None:
            t.ema.step(t.params)
        if t.step % cfg.train.log_every == 0 or t.step == cfg.train.max_steps:
            losses.append((t.step, _log_step(t, progress, loss_sum, count)))
            loss_sum, count = torch.zeros((), device=acc.device), 0
        if stop_at is not None and stop_at(t.step):
            flag.forced = True
        if flag.agreed(acc):  # before validating: the grace period goes to the checkpoint first
            save_checkpoint(t, job_id)
            return losses, True
        if t.step % cfg.train.checkpoint_every == 0 and t.step < cfg.train.max_steps:
            save_checkpoint(t, job_id)
        if _validation_due(t):
            _validate(t)
            if flag.agreed(acc):  # a signal that came while validating: save now, not a step later
                save_checkpoint(t, job_id)
                return losses, True
    return losses, False


def train(
    cfg: Config,
    flag: PreemptionFlag | None = None,
    stop_at: Callable[[int], bool] | None = None,
    job_id: str | None = None,
) -> TrainResult:
    """Fine-tune the UNet; resume from the run's newest complete checkpoint; export the pipeline at the end.

    ``flag`` carries the scheduler's preemption signal; ``stop_at(step)`` lets tests stop at a chosen step
    exactly the way a preemption does (collective save, then return with ``interrupted=True``).
    """
    flag = flag or PreemptionFlag()
    t = build_trainer(cfg)
    acc = t.accelerator
    if acc.is_main_process:
        t.paths.root.mkdir(parents=True, exist_ok=True)
    _resume(t)
    if t.step == 0:
        _set_aside_previous_run(t)
    effective = cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
    log.info(
        "training %s: steps %d->%d, effective batch %d (per device %d x accumulation %d x %d processes)",
        t.comps.source,
        t.step,
        cfg.train.max_steps,
        effective,
        cfg.train.batch_size,
        cfg.train.grad_accum,
        acc.num_processes,
    )
    tracking.start(acc, cfg, t.paths, t.step)
    try:
        return _train_and_export(t, flag, stop_at, job_id)
    finally:
        tracking.end(acc, cfg)


def _train_and_export(
    t: Trainer, flag: PreemptionFlag, stop_at: Callable[[int], bool] | None, job_id: str | None
) -> TrainResult:
    cfg, acc = t.cfg, t.accelerator
    losses, interrupted = _loop(t, flag, stop_at, job_id)
    log.info("unet weights checksum at step %d: %s", t.step, weights_checksum(t.unet))
    result = TrainResult(t.paths.root, t.step, interrupted, losses=losses)
    if interrupted:
        return result
    saved = None
    if acc.is_main_process:  # rank 0 decides: save_checkpoint is collective
        newest = checkpoint.complete_checkpoints(t.paths.checkpoints, warn=False)
        saved = bool(newest) and checkpoint.read_meta(newest[0]).step == t.step
    if not rank0_decides(acc, saved):
        save_checkpoint(t, job_id)
    _validate(t)
    acc.wait_for_everyone()
    if acc.is_main_process:
        from sdcluster.export import export_pipeline

        result.model_dir = export_pipeline(
            t.paths.model,
            t.comps.source,
            acc.unwrap_model(t.unet),
            t.comps.text_encoder,
            t.comps.vae,
            t.comps.tokenizer,
            t.ema,
            prediction_type=cfg.train.prediction_type,
        )
    acc.wait_for_everyone()
    return result
