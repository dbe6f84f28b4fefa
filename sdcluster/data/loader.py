"""What the training loop reads: cached encoder outputs when ``data.cache`` allows, else images.

Both kinds of example are addressed by the sampler's ``(index, aug_seed)`` keys, so which one a run uses
changes neither the data order nor resume; :meth:`sdcluster.train.method.Method.model_inputs` turns either
batch into the denoiser's inputs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from sdcluster.config import Config

log = logging.getLogger("sdcluster")


def training_rows(cfg: Config) -> Any:
    """The training split of the image folder (or of every source of ``data.sources``, source after
    source): every row but the held-out ones, the first ``data.max_samples`` of them when set. With
    ``data.snapshot``, the rows the launch pinned (:mod:`~sdcluster.data.snapshot`): no file is read here."""
    from sdcluster.data.sources import counts_of, every_row, split_rows

    table = every_row(cfg)
    train, _ = split_rows(cfg.data, counts_of(cfg, table))
    return table.select(train)


def bucket_ids(cfg: Config, dataset: Any, examples: Any = None) -> list[int] | None:
    """Each training row's bucket (an index into :func:`~sdcluster.data.buckets.buckets_of`), from each
    image's upright size; None when ``data.buckets`` is off. Cached ``examples`` hold those sizes (their
    entry's manifest, in row order), so a start reads the image-facts index once, for the cache's key, not
    again here (a stat of every image: 2 s at 100,000)."""
    from sdcluster.data.buckets import assign, buckets_of
    from sdcluster.data.latent_cache import CachedExamples
    from sdcluster.data.snapshot import row_facts

    buckets = buckets_of(cfg)
    if buckets is None:
        return None
    cached = isinstance(examples, CachedExamples)
    sizes = examples.originals if cached else row_facts(cfg, dataset)[1]
    return [assign(size, buckets) for size in sizes]


def training_examples(
    cfg: Config, comps: Any, accelerator: Any, dataset: Any = None
) -> torch.utils.data.Dataset:
    """The training split, from the latent cache (built on first use) or as images to encode every step
    when caching is off or not worth it for this crop policy. ``dataset``: :func:`training_rows`, read
    here when not given."""
    from sdcluster.data.buckets import buckets_of
    from sdcluster.data.dataset import TrainImages
    from sdcluster.data.snapshot import readable

    dataset = training_rows(cfg) if dataset is None else dataset
    if cfg.data.cache:
        from sdcluster.data.latent_build import open_or_build

        cached = open_or_build(cfg, dataset, comps, accelerator)
        if cached is not None:
            return cached
    train = cfg.train
    return TrainImages(
        readable(cfg, dataset),  # the images, every step: a snapshot's checked against it first
        comps.family.tokenizers(comps),
        train.resolution,
        train.center_crop,
        train.random_flip,
        cfg.data.caption_column,
        buckets_of(cfg),
    )


def make_loader(cfg: Config, comps: Any, accelerator: Any, micro_step: int) -> torch.utils.data.DataLoader:
    """An endless loader of this rank's batches from ``micro_step`` on (one batch per micro-step)."""
    from sdcluster.data.dataset import collate
    from sdcluster.data.sampler import BucketSampler, StepSampler
    from sdcluster.data.sources import repeats_of, stream_rows

    acc = accelerator
    rows = training_rows(cfg)
    examples = training_examples(cfg, comps, acc, rows)
    args = (cfg.train.batch_size, acc.num_processes, acc.process_index, cfg.train.seed, micro_step)
    stream = stream_rows(repeats_of(cfg, rows))  # data.sources' repeats: rows listed again, not stored again
    items = len(examples) if stream is None else len(stream)
    buckets = bucket_ids(cfg, rows, examples)
    if buckets is not None and stream is not None:
        buckets = [buckets[row] for row in stream]
    sampler = (
        StepSampler(items, *args, rows=stream)
        if buckets is None
        else BucketSampler(buckets, *args, rows=stream)
    )
    first = [sampler.key(p)[0] for p in sampler.positions(micro_step)]
    log.info(
        "data: %d images (%d examples an epoch), epoch %d, this rank's next samples %s",
        len(examples),
        items,
        sampler.epoch_of(micro_step),
        first,
    )
    if isinstance(sampler, BucketSampler):
        _log_buckets(cfg, sampler)
    return torch.utils.data.DataLoader(
        examples,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
        pin_memory=acc.device.type == "cuda",  # page-locked batches copy to the GPU asynchronously
    )


def _log_buckets(cfg: Config, sampler: Any) -> None:
    """One line of the bucket histogram and the epoch's length (padding makes it longer than N / batch)."""
    from sdcluster.data.buckets import buckets_of

    buckets = buckets_of(cfg) or ()
    counts = ", ".join(f"{buckets[b]}: {len(rows)}" for b, rows in sampler.members.items())
    log.info(
        "data.buckets: %s images per bucket; %d micro-steps an epoch at a global batch of %d",
        counts,
        sampler.steps_per_epoch,
        sampler.global_batch,
    )
