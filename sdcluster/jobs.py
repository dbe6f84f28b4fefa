"""The callables submitit runs (locally or under SLURM): the same code on every rank, no Hydra.

Each job sets up logging and the distributed environment, records its attempt in ``jobs/<id>/job.json``,
runs the work, and on a preemption signal decides (rank 0, after the collective save) whether to requeue.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit

from sdcluster import ledger, paths
from sdcluster.config import Config
from sdcluster.distributed import DistInfo, setup
from sdcluster.preemption import PreemptionFlag, classify

log = logging.getLogger("sdcluster")


@dataclass
class Outcome:
    """What a job body reports back: how far it got and whether it stopped early for a signal."""

    interrupted: bool
    step: int | None = None
    outputs: dict[str, str] | None = None


def setup_logging(rank: int) -> None:
    """Timestamped lines with the rank, to stdout (submitit files it as jobs/<id>/<id>_<rank>_log.out)."""
    fmt = f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("sdcluster")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
    for noisy in ("diffusers", "transformers", "accelerate", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # Library progress bars are carriage-return spam in a log file; our own progress lines replace them.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()


def _requeue_or_stop(cfg: Config, folder: Path | None, flag: PreemptionFlag, step: Any, started: float):
    """Rank 0 after the collective save: requeue within budget, else end the job with a clear reason."""
    reason = classify(time.time() - started, cfg.cluster.timeout_min, cfg.cluster.signal_delay_s)
    state = "TIMEOUT" if reason == "timeout" else "PREEMPTED"
    budget = cfg.cluster.max_timeouts if state == "TIMEOUT" else cfg.cluster.max_requeues
    used = ledger.count_attempts(folder, state) if folder else 0
    requeue = cfg.cluster.name == "slurm" and used < budget
    if folder:
        ledger.end_attempt(folder, state, step=step, exit_reason=reason, requeued=requeue)
    if requeue:
        log.warning("%s at step %s: state saved, requeueing (%d/%d used)", reason, step, used + 1, budget)
        flag.requeue_through_submitit()  # exits the process
    hint = "rerun the same command to resume" if cfg.cluster.name == "local" else "resubmit to resume"
    key = "cluster.max_timeouts" if state == "TIMEOUT" else "cluster.max_requeues"
    raise RuntimeError(
        f"{reason} at step {step}; state saved; not requeued ({key}={budget}, used {used}): {hint}"
    )


def run_job(cfg: Config, task: str, body: Callable[[Config, PreemptionFlag, DistInfo], Outcome]) -> dict:
    """Wrap a job body with logging, attempt records and the preemption protocol."""
    started = time.time()
    setup_logging(int(os.environ.get("SLURM_PROCID", "0") or 0))
    dist = setup(use_gpus=cfg.cluster.gpus_per_node > 0)
    folder = paths.job_dir(cfg, dist.job_id) if dist.job_id else None
    is_main = dist.rank == 0
    flag = PreemptionFlag()
    flag.install()
    if is_main and folder:
        ledger.start_attempt(folder, dist.restart_count)
    log.info("%s job %s started (attempt %d)", task, dist.job_id or "-", dist.restart_count + 1)
    try:
        outcome = body(cfg, flag, dist)
    except Exception as err:
        if is_main and folder:
            oom = isinstance(err, MemoryError) or "out of memory" in str(err).lower()
            ledger.end_attempt(folder, "FAILED", exit_reason="out of memory" if oom else repr(err)[:500])
        raise
    if outcome.interrupted:
        if not is_main:
            return {"task": task, "interrupted": True, "rank": dist.rank}
        _requeue_or_stop(cfg, folder, flag, outcome.step, started)
    if is_main and folder:
        ledger.end_attempt(folder, "COMPLETED", step=outcome.step, outputs=outcome.outputs or {})
    return {"task": task, "step": outcome.step, "outputs": outcome.outputs or {}}


def _train_body(cfg: Config, flag: PreemptionFlag, dist: DistInfo) -> Outcome:
    from sdcluster.train import train

    result = train(cfg, flag=flag, job_id=dist.job_id)
    outputs = {"run_dir": str(result.run_dir)}
    if result.model_dir:
        outputs["model"] = str(result.model_dir)
    return Outcome(result.interrupted, result.step, outputs)


def _generate_body(cfg: Config, flag: PreemptionFlag, dist: DistInfo) -> Outcome:
    from sdcluster.generate import generate_images

    shard, shards = _shard_of(cfg, dist)
    result = generate_images(cfg, shard_index=shard, num_shards=shards, should_stop=lambda: flag.raised)
    outputs = {"images": str(result.out_dir)}
    return Outcome(result.interrupted, result.generated + result.skipped, outputs)


def _shard_of(cfg: Config, dist: DistInfo) -> tuple[int, int]:
    """Array task k of K and rank r of W together take share k*W + r of K*W."""
    array_task = int(os.environ.get("SLURM_ARRAY_TASK_ID", "0") or 0) if cfg.generate.shards > 1 else 0
    return array_task * dist.world_size + dist.rank, cfg.generate.shards * dist.world_size


class TrainJob(submitit.helpers.Checkpointable):
    """Checkpointable so that submitit requeues it; its state lives in the run folder, not the pickle."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def __call__(self) -> dict:
        return run_job(self.cfg, "train", _train_body)


class GenerateJob(submitit.helpers.Checkpointable):
    """Requeued generation skips finished images, so the resubmitted callable is simply itself."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def __call__(self) -> dict:
        return run_job(self.cfg, "generate", _generate_body)
