"""Image files: a PNG written atomically with its record inside, and image grids.

One grid drawer serves the generation folder's contact sheet and training's validation ``grid.png``.
diffusers' ``make_image_grid`` would hold every image in memory at once and needs ``rows x cols`` to equal
the count, which a 10,000-image contact sheet cannot afford; this one opens one image at a time. Past
:data:`SHEET_TILES` images the sheet is a sample, a few tiles from every group (:func:`sample_per_group`):
100,000 tiles of a few pixels each would show nothing.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdcluster import atomic


def save_png_atomic(image: Image.Image, path: Path, record: dict[str, Any] | None = None) -> None:
    """Save ``image`` as PNG with ``record`` in a text chunk, so a copied image still says how it was made."""
    info = PngInfo()
    if record is not None:
        info.add_text("sdcluster", json.dumps(record, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    atomic.write_bytes(path, buffer.getvalue())


def draw_grid(files: list[Path], cell: tuple[int, int]) -> Image.Image:
    """A near-square grid of ``files`` in order, each shrunk (never enlarged) to fit a ``cell``."""
    cols = max(1, math.ceil(math.sqrt(len(files))))
    rows = max(1, math.ceil(len(files) / cols))
    width, height = cell
    grid = Image.new("RGB", (cols * width, rows * height), "white")
    for n, path in enumerate(files):
        with Image.open(path) as image:
            tile = image.convert("RGB")
        tile.thumbnail(cell)
        grid.paste(tile, ((n % cols) * width, (n // cols) * height))
    return grid


def first_size(files: list[Path]) -> tuple[int, int]:
    with Image.open(files[0]) as first:
        return first.size


def full_size_grid(files: list[Path], dest: Path) -> Path:
    """The images at full size in one grid (validation: a few images of one size)."""
    save_png_atomic(draw_grid(files, first_size(files)), dest)
    return dest


SHEET_TILES = 1024
"""At most this many tiles on a contact sheet: 32 x 32 tiles of 128 px, a 4096-px sheet."""


def sample_per_group(
    keyed: list[tuple[Hashable, Path]] | Callable[[], Iterable[tuple[Hashable, Path]]],
    max_tiles: int = SHEET_TILES,
    sizes: dict[Hashable, int] | None = None,
) -> list[Path]:
    """All files if they fit, else a bounded number from each group, spread evenly over it, in order.

    ``keyed`` pairs each file with its group (template and slot values, or prompt) in sheet order: a list,
    or a function giving those pairs afresh (read twice: the group sizes, then the picks), so a sheet of a
    100,000-image folder holds its picks only. Every group gets ``max_tiles // groups`` tiles (at least
    one); with more groups than tiles, groups are sampled evenly too, so the sheet still spans the whole run.
    """
    pairs = keyed if callable(keyed) else lambda: keyed
    if sizes is None:  # else the caller counted the groups (in first-seen order) as the pairs went by
        sizes = {}
        for key, _ in pairs():
            sizes[key] = sizes.get(key, 0) + 1
    if sum(sizes.values()) <= max_tiles:
        return [path for _, path in pairs()]
    groups = list(sizes)
    if len(groups) > max_tiles:
        groups = [groups[round(k * (len(groups) - 1) / (max_tiles - 1))] for k in range(max_tiles)]
    per_group = max(1, max_tiles // len(groups))
    wanted: dict[Hashable, set[int]] = {}
    for key in groups:
        size = sizes[key]
        step = size / per_group
        wanted[key] = set(range(size)) if size <= per_group else {int(k * step) for k in range(per_group)}
    picked: dict[Hashable, list[Path]] = {key: [] for key in groups}
    seen = dict.fromkeys(sizes, 0)
    for key, path in pairs():
        if seen[key] in wanted.get(key, ()):
            picked[key].append(path)
        seen[key] += 1
    return [path for key in groups for path in picked[key]]


def contact_sheet(files: list[Path], dest: Path, tile: int = 128, max_side: int = 4096) -> Path:
    """Every image as a square thumbnail tile, so the sheet stays under ``max_side`` pixels a side.

    Tiles are at most ``tile`` pixels (never larger than the images) and shrink with the count: a
    10,000-image run still gives a sheet an image viewer opens.
    """
    cols = max(1, math.ceil(math.sqrt(len(files))))
    if files:
        tile = min(tile, max(first_size(files)))
    size = max(8, min(tile, max_side // cols))
    save_png_atomic(draw_grid(files, (size, size)), dest)
    return dest
