"""The fine-tuning job: accelerate-driven denoiser training, resumed by default, stopped at step boundaries.

Every rank runs this same function. Run on CPU (tiny model), one GPU, or N processes under SLURM; the
difference is only the environment :mod:`sdcluster.runtime.distributed` exported before the Accelerator
exists.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdcluster import atomic, paths
from sdcluster.config import Config
from sdcluster.progress import ProgressLog
from sdcluster.redaction import config_yaml
from sdcluster.runtime import ownership, step_events
from sdcluster.runtime.distributed import rank0_decides
from sdcluster.runtime.requeue import PreemptionFlag
from sdcluster.train import metrics, tracking
from sdcluster.train.checkpointer import Checkpointer
from sdcluster.train.loss import diffusion_loss, step_generator
from sdcluster.train.trainer import Trainer, build_trainer, weights_checksum

log = logging.getLogger("sdcluster")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    interrupted: bool
    model_dir: Path | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)


def _loader(t: Trainer) -> Any:
    from sdcluster.data.loader import make_loader

    cfg = t.cfg
    if t.method.trains_text_encoder and cfg.data.cache:
        # The cache holds the frozen text encoder's outputs; an adapted one must see the tokens every step.
        log.info("data.cache: not used, the text encoder is trained (train.lora.text_encoder_lr)")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache=False))
    loader = make_loader(cfg, t.comps, t.accelerator, t.micro_step)
    if _reads_cache(loader):
        _leave_text_encoders(t)
    return loader


def _reads_cache(loader: Any) -> bool:
    from sdcluster.data.latent_cache import CachedExamples

    return isinstance(loader.dataset, CachedExamples)


def _leave_text_encoders(t: Trainer) -> None:
    """The steps read every caption's encodings from the latent cache. Where this job built the cache (its
    encoders are loaded), the text store gets what validation will encode (rank 0; the others wait), then
    every rank lets go of its encoders. A job that found the cache built has loaded none and reads nothing
    more here: for SD 3.5 and FLUX.1 that is T5-XXL, 9.4 GB in bf16, never read."""
    from sdcluster.data import text_store

    acc = t.accelerator
    if acc.is_main_process and t.comps.text_encoders.loaded():
        text_store.fill(t.cfg, t.comps, acc.device)
    acc.wait_for_everyone()
    t.comps.text_encoders.steps_run_them = False
    if not t.comps.text_encoders.release() and not t.comps.text_encoders.ever_loaded:
        log.info("text encoders: none loaded (the latent cache and the text store hold their outputs)")


def _micro_step(t: Trainer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    cfg, acc = t.cfg, t.accelerator
    gen = step_generator(cfg.train.seed, t.micro_step, acc.process_index)
    # Dropout (LoRA's) draws from the global stream: seeded per micro-step too, so a resumed job drops
    # exactly what the uninterrupted one would have, whatever else drew from it since the checkpoint.
    torch.manual_seed(gen.initial_seed())
    with acc.accumulate(*t.models):
        latents, cond = t.method.model_inputs(t.comps, batch, acc.device, gen)
        with acc.autocast():
            loss = diffusion_loss(
                t.denoiser,
                t.objective,
                latents,
                cond,
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
    from sdcluster.train.validation import run_validation

    acc = t.accelerator
    done = t.step in metrics.validated_steps(t.paths.metrics) if acc.is_main_process else None
    if rank0_decides(acc, done):
        return
    with t.strategy.gathered(t) as whole:  # sharded weights gathered whole on each rank (FSDP), else as is
        record = run_validation(whole, t.step)
    tracking.log(t.accelerator, t.cfg, {"val_loss": record["val_loss"]}, t.step)
    if record["images"] is not None:
        tracking.log_image(t.accelerator, t.cfg, "validation", record["images"] / "grid.png", t.step)


# Until a save of this attempt is timed, the job's clock guesses one: four copies of the trained parameters
# (weights, two Adam moments, EMA) written at a pessimistic 100 MB/s, plus a few seconds of bookkeeping.
_GUESS_WRITE_BYTES_PER_S = 100e6
_GUESS_SAVE_OVERHEAD_S = 5.0


def _save(ckpt: Checkpointer, flag: PreemptionFlag) -> None:
    """Save (collective) and tell the job's clock how long it took: its next save is expected as long."""
    started = time.monotonic()
    ckpt.save()
    flag.clock.saved(time.monotonic() - started)


def _loop(t: Trainer, ckpt: Checkpointer, flag: PreemptionFlag) -> tuple[list[tuple[int, float]], bool]:
    cfg, acc = t.cfg, t.accelerator
    progress = ProgressLog(cfg.train.max_steps, "step", start=t.step)
    state_bytes = 4 * sum(p.numel() * p.element_size() for p in t.params)
    flag.clock.expect_save(_GUESS_SAVE_OVERHEAD_S + state_bytes / _GUESS_WRITE_BYTES_PER_S)
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
        # observers: the job's own clock when it has a time limit, else only tests and benchmarks
        step_events.boundary("step", t.step, flag)
        if flag.agreed(acc):  # before validating: the grace period goes to the checkpoint first
            _save(ckpt, flag)
            return losses, True
        if t.step % cfg.train.checkpoint_every == 0 and t.step < cfg.train.max_steps:
            _save(ckpt, flag)
            if flag.agreed(acc):  # the save used the time a step had left (or a signal came): stop, saved
                return losses, True
        if _validation_due(t):
            _validate(t)
            if flag.agreed(acc):  # a signal that came while validating: save now, not a step later
                _save(ckpt, flag)
                return losses, True
    return losses, False


def train(
    cfg: Config,
    flag: PreemptionFlag | None = None,
    job_id: str | None = None,
) -> TrainResult:
    """Fine-tune the denoiser; resume from the run's newest complete checkpoint; export at the end.

    ``flag`` carries the scheduler's preemption signal: at the next step boundary every rank saves and
    the call returns with ``interrupted=True``. Observers of :mod:`sdcluster.runtime.step_events` see each
    boundary first and may raise the flag (tests stop at a chosen step so: ``step_events.stop_at``).
    """
    flag = flag or PreemptionFlag()
    t = build_trainer(cfg)
    acc = t.accelerator
    if acc.is_main_process:
        t.paths.root.mkdir(parents=True, exist_ok=True)
    problem = None
    if acc.is_main_process:  # before anything is written: a second live launch of this run stops here
        try:
            ownership.enter(
                t.paths.root, job_id, cfg.cluster.name, paths.job_dir(cfg, job_id) if job_id else None
            )
        except RuntimeError as err:
            problem = str(err)
    problem = rank0_decides(acc, problem)
    if problem:
        raise RuntimeError(problem)
    ckpt = Checkpointer(t, job_id)
    ckpt.load()
    if acc.is_main_process:  # the run folder tells its own story: the config of its latest attempt
        atomic.write_text(t.paths.config, config_yaml(cfg))
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
        return _train_and_export(t, ckpt, flag)
    finally:
        tracking.end(acc, cfg)


def _train_and_export(t: Trainer, ckpt: Checkpointer, flag: PreemptionFlag) -> TrainResult:
    acc = t.accelerator
    losses, interrupted = _loop(t, ckpt, flag)
    name = t.comps.family.denoiser_name  # "unet weights checksum": what multi-process tests compare
    log.info("%s weights checksum at step %d: %s", name, t.step, weights_checksum(t.denoiser))
    log.info("trained weights checksum at step %d: %s", t.step, weights_checksum(t.params))
    result = TrainResult(t.paths.root, t.step, interrupted, losses=losses)
    if interrupted:
        return result
    ckpt.save_unless_saved()
    _validate(t)
    acc.wait_for_everyone()
    with t.strategy.gathered(t) as whole:  # collective: every rank gives its shards
        if acc.is_main_process:  # a pipeline, or the LoRA file (and a fused pipeline with fuse_export)
            result.model_dir = t.method.export(whole)
    acc.wait_for_everyone()
    return result
