"""Aspect-ratio buckets (``data.buckets``): which sizes exist, and which one an image is trained at.

Without buckets every image is resized so its shorter side is ``train.resolution`` and cropped to a square,
so a portrait product shot loses its top and bottom. With them, as in kohya sd-scripts (``enable_bucket``)
and SimpleTuner, a set of sizes of about the same area is made once (:func:`make_buckets`), each image goes to
the one whose aspect ratio is closest to its own (:func:`assign`), and it is resized to cover that size and
cropped (center or random, ``train.center_crop``) by as little as the two ratios differ. A batch holds one
bucket (:class:`sdcluster.data.sampler.BucketSampler`), so its tensors stack.

The sizes follow kohya's ``make_bucket_resolutions``: every width that is a multiple of ``step``, with the
largest height (also a multiple of ``step``) whose area stays within ``side``², and each transposed; here the
aspect-ratio range is said directly (``max_aspect``) where kohya derives it from ``min/max_bucket_reso``.

Pure functions of sizes and settings, Pillow only for reading image headers: the login node reports the
histogram (``python -m sdcluster.data validate DIR --buckets SIDE``) without torch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import ExifTags, Image

from sdcluster.config.checks import ConfigError

if TYPE_CHECKING:
    from sdcluster.config import Config
    from sdcluster.config.data import BucketConfig

Size = tuple[int, int]
"""``(width, height)`` in pixels, as Pillow gives it."""


@dataclass(frozen=True, order=True)
class Bucket:
    """One training size; buckets sort by aspect ratio (tallest first)."""

    aspect: float
    width: int
    height: int

    @property
    def size(self) -> Size:
        return self.width, self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def make_buckets(side: int, step: int = 64, max_aspect: float = 2.0) -> tuple[Bucket, ...]:
    """Every size with sides multiples of ``step``, area at most ``side``², aspect ratio within
    ``1:max_aspect .. max_aspect:1``, each width with the tallest height that fits (kohya's rule), sorted
    by aspect ratio. The square ``s x s`` (``s``: ``side`` rounded down to ``step``) is always one."""
    if step <= 0 or side < step:
        raise ConfigError(
            f"data.buckets: no bucket of sides multiples of {step} fits in {side}x{side}. "
            f"Fix: set data.buckets.side to at least {step}, or a smaller data.buckets.step"
        )
    area = side * side
    square = side // step * step
    sizes = {(square, square)}
    for width in range(step, area // step + 1, step):
        height = area // width // step * step
        if height >= step and max(width / height, height / width) <= max_aspect:
            sizes.update({(width, height), (height, width)})
    return tuple(sorted(Bucket(w / h, w, h) for w, h in sizes))


def buckets_of(cfg: Config) -> tuple[Bucket, ...] | None:
    """The run's buckets, or None when ``data.buckets.enabled`` is false (one square, as always)."""
    settings = cfg.data.buckets
    if not settings.enabled:
        return None
    return make_buckets(target_side(settings, cfg.train.resolution), settings.step, settings.max_aspect)


def target_side(settings: BucketConfig, resolution: int) -> int:
    """``data.buckets.side``, or ``train.resolution`` when it is null."""
    return settings.side if settings.side is not None else resolution


def identity_of(cfg: Config) -> dict[str, Any] | None:
    """What the latent cache's key records of the buckets (the side resolved), or None when off."""
    settings = cfg.data.buckets
    if not settings.enabled:
        return None
    side = target_side(settings, cfg.train.resolution)
    return {"side": side, "step": settings.step, "max_aspect": settings.max_aspect}


def assign(size: Size, buckets: Sequence[Bucket]) -> int:
    """The index in ``buckets`` of the one closest to the aspect ratio of an image of ``size``.

    Closest in log ratio, where kohya compares ``width/height`` linearly: a portrait image and its
    transposed landscape twin then pick transposed buckets. A tie goes to the squarer bucket, then the
    first.
    """
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"an image of size {size} has no aspect ratio")
    ratio = math.log(width / height)
    return min(
        range(len(buckets)),
        key=lambda i: (abs(math.log(buckets[i].aspect) - ratio), abs(math.log(buckets[i].aspect)), i),
    )


def assign_all(sizes: Iterable[Size], buckets: Sequence[Bucket]) -> list[int]:
    """:func:`assign` for each image."""
    return [assign(size, buckets) for size in sizes]


def cover_size(size: Size, target: Size) -> Size:
    """The size an image of ``size`` is resized to so it covers ``target`` (then cropped to it).

    Square targets give exactly what the square crop has always used: the shorter side becomes the
    resolution and the longer one is truncated, as torchvision's ``Resize(int)`` in the seed script did.
    """
    width, height = size
    scale = max(target[0] / width, target[1] / height)
    return max(target[0], int(width * scale)), max(target[1], int(height * scale))


def upright_size_of(image: Image.Image) -> Size:
    """``(width, height)`` of an opened image once EXIF rotation is applied."""
    width, height = image.size
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def upright_size(path: Path | str) -> Size:
    """An image file's size after EXIF rotation, read from its header (no pixels are decoded)."""
    with Image.open(path) as image:
        return upright_size_of(image)


def histogram(sizes: Iterable[Size], buckets: Sequence[Bucket]) -> list[tuple[Bucket, int]]:
    """How many images go to each bucket (buckets with none left out), in bucket order."""
    counts = Counter(assign_all(sizes, buckets))
    return [(buckets[i], counts[i]) for i in sorted(counts)]


def histogram_lines(sizes: Sequence[Size], buckets: Sequence[Bucket], global_batch: int = 1) -> list[str]:
    """The histogram as ``data validate`` prints it, one bucket a line; a bucket with fewer images than
    the batch is marked (its batch repeats images, see ``BucketSampler``)."""
    lines = [f"buckets: {len(buckets)} sizes, {len(sizes)} images"]
    for bucket, count in histogram(sizes, buckets):
        small = f" (fewer than a batch of {global_batch}: images repeat)" if count < global_batch else ""
        lines.append(f"  {bucket!s:>11} (aspect {bucket.aspect:.2f}): {count} images{small}")
    return lines
