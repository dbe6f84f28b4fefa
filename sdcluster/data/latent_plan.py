"""What a latent-cache entry holds: which crop/flip of which image each row is, which caption row each image
has, and the key (:mod:`~sdcluster.data.latent_cache` says why, and owns the format on disk).

Planned from image headers and captions only (no pixel is decoded), so the key and the rows are known before
anything is encoded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdcluster.config import Config
from sdcluster.data.buckets import Size, assign, buckets_of, identity_of
from sdcluster.data.dataset import Target, crop_and_flip, resized_size, target_size
from sdcluster.data.snapshot import row_facts
from sdcluster.data.sources import column
from sdcluster.identity import latent_cache_key
from sdcluster.models.load import encoder_parts, model_files, vae_files

if TYPE_CHECKING:
    from sdcluster.models.load import Components

log = logging.getLogger("sdcluster")

CACHE_VERSION = 2  # bump when what an entry holds changes: old entries then get new keys (2: time ids)
MAX_MEAN_CROPS = 32  # distinct random crops per image (on average) beyond which the cache is not used
Variant = tuple[int, int, int, bool]  # (image row, crop left, crop top, mirrored)


@dataclass
class Plan:
    """What an entry holds: ``variants[row]`` is the crop/flip of one posterior row."""

    key: str
    sizes: list[tuple[int, int]]  # resized, what the crops are taken from
    variants: list[Variant]
    captions: list[str]
    caption_rows: list[int]
    originals: list[tuple[int, int]]  # upright sizes before resizing (SDXL's conditioning)
    text_arrays: tuple[str, ...] = ("text",)  # the family's caption arrays
    empty_row: int | None = None  # the empty caption's row (data.caption_dropout), else not stored
    targets: list[Size] | None = None  # each image's bucket (data.buckets), else every one is the square

    def target(self, image: int, resolution: int) -> Target:
        """What image ``image`` is cropped to: its bucket's size, or the ``resolution`` square."""
        return resolution if self.targets is None else self.targets[image]

    def posterior_arrays(self) -> list[tuple[str, int, int]]:
        """``(name, first row, end row)`` of each posterior array: ``posterior`` holds every row without
        buckets; with them, each run of one bucket's rows is ``posterior.WxH`` (the rows are in bucket
        order, :func:`make_plan`)."""
        if self.targets is None:
            return [("posterior", 0, len(self.variants))]
        arrays: list[tuple[str, int, int]] = []
        for row, (image, *_) in enumerate(self.variants):
            name = "posterior.{}x{}".format(*self.targets[image])
            if arrays and arrays[-1][0] == name:
                arrays[-1] = (name, arrays[-1][1], row + 1)
            else:
                arrays.append((name, row, row + 1))
        return arrays


def _crop_offsets(size: Size, resolution: Target, center_crop: bool) -> list[tuple[int, int]]:
    if center_crop:
        left, top, _ = crop_and_flip(size, resolution, True, False, 0)
        return [(left, top)]
    (width, height), (crop_w, crop_h) = size, target_size(resolution)
    return [(left, top) for top in range(height - crop_h + 1) for left in range(width - crop_w + 1)]


def plan_variants(
    sizes: list[Size],
    resolution: int,
    center_crop: bool,
    random_flip: bool,
    targets: list[Size] | None = None,
) -> list[Variant]:
    """Every (image, crop, flip) the augmentation can produce, image by image (each image decoded once);
    with ``targets`` (each image's bucket) grouped by bucket, in bucket order, images in row order within."""
    flips = (False, True) if random_flip else (False,)
    images = range(len(sizes)) if targets is None else sorted(range(len(sizes)), key=targets.__getitem__)
    return [
        (image, left, top, flip)
        for image in images
        for left, top in _crop_offsets(
            sizes[image], resolution if targets is None else targets[image], center_crop
        )
        for flip in flips
    ]


def make_plan(cfg: Config, dataset: Any, comps: Components) -> Plan | None:
    """The entry this run needs, or None (with one log line) when its crop policy is not worth caching."""
    res, center, flip = cfg.train.resolution, cfg.train.center_crop, cfg.train.random_flip
    dropout = cfg.data.caption_dropout > 0
    captions = column(dataset, cfg.data.caption_column)
    if not all(isinstance(c, str) for c in captions):
        raise ValueError("some rows have no caption string; run `python -m sdcluster.data validate`")
    # as the launch pinned them (data.snapshot), else from the index (read once per version of each file)
    shas, originals = row_facts(cfg, dataset)
    buckets = buckets_of(cfg)
    targets = None if buckets is None else [buckets[assign(size, buckets)].size for size in originals]
    crop_sizes = [(res, res)] * len(originals) if targets is None else targets
    sizes = [resized_size(size, target) for size, target in zip(originals, crop_sizes, strict=True)]
    pairs = zip(sizes, crop_sizes, strict=True)
    crops = len(sizes) if center else sum((w - cw + 1) * (h - ch + 1) for (w, h), (cw, ch) in pairs)
    if crops > MAX_MEAN_CROPS * len(sizes):
        log.info(
            "latent cache off: random crops of these images give %.0f distinct crops per image on average "
            "(more than %d), so the VAE encodes every step. Fix: train.center_crop=true, "
            "data.buckets.enabled=true (a crop then covers the image's bucket), or square images",
            crops / len(sizes),
            MAX_MEAN_CROPS,
        )
        return None
    family = comps.family
    key = latent_cache_key(
        cfg,
        version=CACHE_VERSION,
        family=family.name,
        source=comps.source,
        files=model_files(comps.source, encoder_parts(family), cfg.model.revision),
        vae_files=vae_files(cfg.model.vae_path) if cfg.model.vae_path else None,
        # what each encoder computes in, known without loading it (models.text_encoders)
        dtypes=[str(comps.vae.dtype), *map(str, comps.text_encoders.dtypes().values())],
        images=list(zip(shas, captions, strict=True)),  # pairs: hashed as the lists they always were
        empty_caption=dropout,
        buckets=identity_of(cfg),
    )
    unique = list(dict.fromkeys(captions))
    row_of = {caption: row for row, caption in enumerate(unique)}
    variants = plan_variants(sizes, res, center, flip, targets)
    rows = [row_of[c] for c in captions]
    empty_row = None
    if dropout:  # a row of its own unless a caption is empty already; after the others, which keep theirs
        empty_row = row_of.get("", len(unique))
        unique += [] if "" in row_of else [""]
    return Plan(key, sizes, variants, unique, rows, originals, family.text_arrays, empty_row, targets)


def entry_manifest(plan: Plan, world: int) -> dict[str, Any]:
    """The entry manifest without its file list (:func:`commit` adds it): what readers need besides the
    arrays, which crop/flip each row is and which caption row each image has (and the empty caption's)."""
    empty = {} if plan.empty_row is None else {"empty_row": plan.empty_row}
    if plan.targets is not None:  # only with buckets: entries without them keep the manifest they had
        empty |= {"targets": plan.targets, "posterior_arrays": plan.posterior_arrays()}
    return {
        **empty,
        "version": CACHE_VERSION,
        "key": plan.key,
        "world_size": world,
        "sizes": plan.sizes,
        "originals": plan.originals,
        "variants": plan.variants,
        "caption_rows": plan.caption_rows,
        "text_arrays": list(plan.text_arrays),
    }
