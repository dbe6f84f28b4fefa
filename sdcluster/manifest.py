"""The files of a generation folder: images written atomically, per-shard manifest parts, the merged manifest.

Layout of one generation folder (see :func:`sdcluster.paths.generation_dir`)::

    p0000-i0000.png ...                     one image per (prompt index, image index), its record inside
    settings.json                           the generate settings and prompts that made this folder
    manifest.parts/shard-<i>-of-<n>.jsonl   appended by each shard: one JSON record per image it wrote
    manifest.jsonl                          merged: every image on disk exactly once, (prompt, image) order
    contact_sheet.png                       all images as thumbnails in one grid

Shards never write the same file: each owns its part and its images, so array tasks need no locking. An image
is renamed into place before its record is appended, so a record always points at a complete image; a crash
in between leaves an image without a record, which the next run of that generation job re-adds.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdcluster import atomic

log = logging.getLogger(__name__)

PARTS_DIR = "manifest.parts"
MANIFEST = "manifest.jsonl"
SETTINGS = "settings.json"
CONTACT_SHEET = "contact_sheet.png"
_IMAGE_NAME = re.compile(r"^p(\d+)-i(\d+)\.png$")


def image_name(prompt_index: int, image_index: int) -> str:
    """``p0003-i0007.png``: stable, sortable, free of prompt text (prompts can be long or unsafe in paths)."""
    return f"p{prompt_index:04d}-i{image_index:04d}.png"


def part_path(out_dir: Path, index: int, count: int) -> Path:
    return Path(out_dir) / PARTS_DIR / f"shard-{index}-of-{count}.jsonl"


def save_png_atomic(image: Image.Image, path: Path, record: dict[str, Any] | None = None) -> None:
    """Save ``image`` as PNG with ``record`` in a text chunk, so a copied image still says how it was made."""
    info = PngInfo()
    if record is not None:
        info.add_text("sdcluster", json.dumps(record, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    atomic.write_bytes(path, buffer.getvalue())


def append_record(part: Path, record: dict[str, Any]) -> None:
    """Append one JSON line; a line torn by a crash is closed first so it cannot swallow the next record."""
    part.parent.mkdir(parents=True, exist_ok=True)
    with open(part, "a+b") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write((json.dumps(record, sort_keys=True) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file, skipping (and logging) lines a crash left incomplete."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping an incomplete record (interrupted write)", path, number)
    return records


def part_files(out_dir: Path) -> list[Path]:
    return sorted((Path(out_dir) / PARTS_DIR).glob("shard-*.jsonl"))


def recorded_files(out_dir: Path) -> set[str]:
    """Names of the images that have a record in any part (whichever shard count wrote it)."""
    return {r["file"] for part in part_files(out_dir) for r in read_records(part)}


def image_files(out_dir: Path) -> list[Path]:
    """The finished images of a folder, in (prompt index, image index) order; temp files are not matched."""
    found = [(m, p) for p in Path(out_dir).iterdir() if (m := _IMAGE_NAME.match(p.name))]
    return [p for m, p in sorted(found, key=lambda mp: (int(mp[0][1]), int(mp[0][2])))]


def merge_manifest(out_dir: Path) -> Path:
    """Merge every part into ``manifest.jsonl`` (each image on disk once, sorted); redraw the contact sheet.

    Records whose image was deleted are dropped and images without a record are reported, so the manifest
    always describes exactly the images that are there.
    """
    out_dir = Path(out_dir)
    parts = part_files(out_dir)
    if not parts:
        raise FileNotFoundError(
            f"no manifest parts in {out_dir / PARTS_DIR}: not a generation folder, or no shard wrote yet"
        )
    on_disk = {p.name for p in image_files(out_dir)}
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for record in read_records(part):
            if record["file"] in on_disk:
                merged.setdefault(record["file"], record)
    records = sorted(merged.values(), key=lambda r: (r["prompt_index"], r["image_index"]))
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    atomic.write_bytes(out_dir / MANIFEST, text.encode())
    unrecorded = sorted(on_disk - merged.keys())
    if unrecorded:
        log.warning(
            "%d images have no record (e.g. %s); rerun the generation job to re-add them",
            len(unrecorded),
            unrecorded[0],
        )
    contact_sheet(out_dir)
    return out_dir / MANIFEST


def read_manifest(out_dir: Path) -> list[dict[str, Any]]:
    return read_records(Path(out_dir) / MANIFEST)


def contact_sheet(out_dir: Path, tile: int = 128, max_side: int = 4096) -> Path:
    """A near-square grid of every image as thumbnails, in manifest order, written atomically.

    Tiles are at most ``tile`` pixels (never larger than the images) and shrink so the sheet stays under
    ``max_side`` pixels a side: a 10,000-image run still gives a sheet an image viewer opens.
    """
    out_dir = Path(out_dir)
    files = image_files(out_dir)
    cols = max(1, math.ceil(math.sqrt(len(files))))
    rows = max(1, math.ceil(len(files) / cols))
    if files:
        with Image.open(files[0]) as first:
            tile = min(tile, max(first.size))
    size = max(8, min(tile, max_side // cols))
    sheet = Image.new("RGB", (cols * size, rows * size), "white")
    for n, path in enumerate(files):
        with Image.open(path) as image:
            thumb = image.convert("RGB")
            thumb.thumbnail((size, size))
        sheet.paste(thumb, ((n % cols) * size, (n // cols) * size))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    atomic.write_bytes(out_dir / CONTACT_SHEET, buffer.getvalue())
    return out_dir / CONTACT_SHEET
