"""``train.epochs`` as optimizer steps, counted on the login node where the dataset is readable.

The loop, the LR schedule, checkpoints and the run's identity all speak in optimizer steps
(``train.max_steps``); ``train.epochs`` is another way to say how many. It is converted once, before
submission, from the number of training images (after ``data.holdout`` and ``data.max_samples``) and the
effective batch (``train.batch_size`` x ``train.grad_accum`` x the world size), and the config that is
submitted carries the result in ``train.max_steps``: the job, its records (``jobs/<id>/config.yaml``, the
run folder's ``config.yaml``) and the run's folder name all see the number it trains for.
"""

from __future__ import annotations

import dataclasses
import logging
import math

from sdcluster.config import Config, ConfigError
from sdcluster.data import sources

log = logging.getLogger("sdcluster")


def training_size(cfg: Config) -> int:
    """How many images an epoch reads: the rows the job's reader accepts, less the holdout, at most
    ``data.max_samples``; with ``data.sources`` each counted its source's ``repeats`` times."""
    return sources.training_size(cfg)


def steps_for_epochs(epochs: int, images: int, effective_batch: int) -> int:
    """Optimizer steps that read every training image ``epochs`` times: the sampler never drops a partial
    batch (epochs straddle steps instead), so the last step of an epoch is counted, not dropped."""
    return max(1, math.ceil(epochs * images / effective_batch))


def bucket_epoch(cfg: Config, global_batch: int) -> tuple[int, int] | None:
    """With ``data.buckets``, (examples, micro-steps) of one epoch as
    :class:`~sdcluster.data.sampler.BucketSampler` deals them: each bucket's images (with their repeats) in
    global batches of ``global_batch``, its last batch topped up from the same bucket, so an epoch is longer
    than images / batch. From each training image's upright size
    (:func:`~sdcluster.data.sources.training_sizes`); None without buckets."""
    from collections import Counter

    from sdcluster.data.buckets import assign, buckets_of

    buckets = buckets_of(cfg)
    if buckets is None:
        return None
    sizes, repeats = sources.training_sizes(cfg)
    images: Counter[int] = Counter()
    for size, times in zip(sizes, repeats, strict=True):
        images[assign(size, buckets)] += times
    return sum(repeats), sum(math.ceil(count / global_batch) for count in images.values())


def resolve_length(cfg: Config) -> Config:
    """``cfg`` with ``train.max_steps`` counted from ``train.epochs`` (``cfg`` itself is left as it is);
    ``cfg`` when no epochs are set. A ``train.max_steps`` set to another number is refused: exactly one of
    the two decides the length."""
    train = cfg.train
    if train.epochs is None:
        return cfg
    world = cfg.cluster.world_size
    effective = train.batch_size * train.grad_accum * world
    bucketed = bucket_epoch(cfg, train.batch_size * world)
    if bucketed is None:
        images, micro = training_size(cfg), None
        steps = steps_for_epochs(train.epochs, images, effective)
    else:  # each bucket's last batch topped up: epochs of whole batches, not straddled
        images, micro = bucketed
        steps = max(1, math.ceil(train.epochs * micro / train.grad_accum))
    if train.max_steps is not None and train.max_steps != steps:
        raise ConfigError(
            f"train.max_steps={train.max_steps} and train.epochs={train.epochs} both set the length, and "
            f"{train.epochs} epochs of {images} images at an effective batch of {effective} are {steps} "
            "steps. Fix: add train.max_steps=null to train by epochs (an experiment may set max_steps), "
            "or drop train.epochs"
        )
    if micro is None:
        log.info(
            "train.epochs=%d: %d images x %d epochs / effective batch %d (%d x %d x %d processes) = "
            "train.max_steps=%d",
            train.epochs,
            images,
            train.epochs,
            effective,
            train.batch_size,
            train.grad_accum,
            world,
            steps,
        )
    else:
        log.info(
            "train.epochs=%d with data.buckets: %d micro-steps an epoch (%d images in batches of %d x %d "
            "processes, each bucket's last batch topped up) x %d epochs / train.grad_accum %d = "
            "train.max_steps=%d",
            train.epochs,
            micro,
            images,
            train.batch_size,
            world,
            train.epochs,
            train.grad_accum,
            steps,
        )
    return dataclasses.replace(cfg, train=dataclasses.replace(train, max_steps=steps))
