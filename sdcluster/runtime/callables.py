"""The callables submitit runs (with any backend): the same code on every rank, no Hydra.

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
from typing import TYPE_CHECKING

import submitit

from sdcluster import atomic, paths
from sdcluster.cluster import backends, records
from sdcluster.runtime import step_events
from sdcluster.runtime.distributed import DistInfo, setup, threads_chosen
from sdcluster.runtime.requeue import PreemptionFlag, requeue_or_stop

if TYPE_CHECKING:
    from sdcluster.config import Config

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


def run_job(cfg: Config, task: str, body: Callable[[Config, PreemptionFlag, DistInfo], Outcome]) -> dict:
    """Wrap a job body with logging, attempt records and the preemption protocol."""
    # Imported here, like the bodies' train and generate: the login side imports this module only to pickle
    # the callables, and the runtime wing sits below models, train and generate.
    from sdcluster.model_source import is_hub_id
    from sdcluster.models.hub import origin

    started = time.time()
    staged = is_hub_id(cfg.model.path) and cfg.model.commit
    staged_vae = bool(cfg.model.vae_path and is_hub_id(cfg.model.vae_path) and cfg.model.vae_commit)
    gen = cfg.generate  # generate.model, generate.lora, the CLIP scorer: pinned when launch staged them
    staged_gen = bool(gen.model_commit or gen.lora_commit or gen.scores.clip_commit)
    staged_data = bool(cfg.data.hub and cfg.data.commit)  # data=hub: jobs read the staged folder
    if staged or staged_vae or staged_gen or staged_data:  # before any hub import: no rank reaches the hub
        os.environ["HF_HUB_OFFLINE"] = "1"
    backend = backends.of(cfg)
    setup_logging(backends.environment().rank)
    dist = setup(use_gpus=cfg.cluster.gpus_per_node > 0)
    folder = paths.job_dir(cfg, dist.job_id) if dist.job_id else None
    is_main = dist.rank == 0
    flag = PreemptionFlag()
    flag.install(backend.stop_signals, backend.end_time())  # the end time: the job keeps its own clock
    if is_main and folder:
        records.start_attempt(folder, dist.restart_count, threads_chosen())
        if staged:
            records.update(folder, {"model": origin(cfg.model)})
        if staged_data:
            from sdcluster.data.hub import origin as data_origin

            records.update(folder, {"data": data_origin(cfg.data)})
    log.info("%s job %s started (attempt %d)", task, dist.job_id or "-", dist.restart_count + 1)
    try:
        # the outputs follow the user's umask (jobs/<id>/ stays private); the test pause, when asked for
        with atomic.output_umask(), step_events.requested_pause():
            outcome = body(cfg, flag, dist)
    except Exception as err:
        if is_main and folder:
            oom = isinstance(err, MemoryError) or "out of memory" in str(err).lower()
            records.end_attempt(folder, "FAILED", exit_reason="out of memory" if oom else repr(err)[:500])
        raise
    if outcome.interrupted:
        if not is_main:
            return {"task": task, "interrupted": True, "rank": dist.rank}
        requeue_or_stop(cfg, folder, flag, outcome.step, started)
    if is_main and folder:
        records.end_attempt(folder, "COMPLETED", step=outcome.step, outputs=outcome.outputs or {})
    return {"task": task, "step": outcome.step, "outputs": outcome.outputs or {}}


def _train_body(cfg: Config, flag: PreemptionFlag, dist: DistInfo) -> Outcome:
    from sdcluster.train.loop import train

    result = train(cfg, flag=flag, job_id=dist.job_id)
    outputs = {"run_dir": str(result.run_dir)}
    if result.model_dir:
        outputs["model"] = str(result.model_dir)
    return Outcome(result.interrupted, result.step, outputs)


def _generate_body(cfg: Config, flag: PreemptionFlag, dist: DistInfo, array_task: int) -> Outcome:
    from sdcluster.generate.job import generate_images

    shard, shards = array_task * dist.world_size + dist.rank, cfg.generate.shards * dist.world_size
    result = generate_images(
        cfg, shard_index=shard, num_shards=shards, should_stop=lambda: flag.raised, job_id=dist.job_id
    )
    outputs = {"images": str(result.out_dir)}
    return Outcome(result.interrupted, result.generated + result.skipped, outputs)


def _cache_body(cfg: Config, flag: PreemptionFlag, dist: DistInfo, array_task: int) -> Outcome:
    from sdcluster.data.latent_array import build_piece

    piece, count = array_task * dist.world_size + dist.rank, cfg.data.cache_shards * dist.world_size
    result = build_piece(cfg, piece, count, should_stop=lambda: flag.raised)
    outputs = {"latent_cache": str(result.entry)} if result.entry else {}
    return Outcome(result.interrupted, result.rows, outputs)


class TrainJob(submitit.helpers.Checkpointable):
    """Checkpointable so that submitit requeues it; its state lives in the run folder, not the pickle."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def __call__(self) -> dict:
        return run_job(self.cfg, "train", _train_body)


class GenerateJob(submitit.helpers.Checkpointable):
    """Shard ``shard`` of ``generate.shards`` (one array task each); rank r of W in it takes share
    ``shard * W + r`` of ``shards * W``. Requeued generation skips finished images, so the resubmitted
    callable is simply itself."""

    def __init__(self, cfg: Config, shard: int = 0) -> None:
        self.cfg = cfg
        self.shard = shard

    def __call__(self) -> dict:
        return run_job(
            self.cfg, "generate", lambda cfg, flag, dist: _generate_body(cfg, flag, dist, self.shard)
        )


class CacheJob(submitit.helpers.Checkpointable):
    """Task ``shard`` of a latent-cache build (``task=cache``, ``data.cache_shards`` tasks); rank r of W in
    it encodes piece ``shard * W + r`` of ``shards * W``. A requeued task keeps the pieces it finished
    (:mod:`sdcluster.data.latent_array`), so the resubmitted callable is simply itself."""

    def __init__(self, cfg: Config, shard: int = 0) -> None:
        self.cfg = cfg
        self.shard = shard

    def __call__(self) -> dict:
        return run_job(self.cfg, "cache", lambda cfg, flag, dist: _cache_body(cfg, flag, dist, self.shard))
