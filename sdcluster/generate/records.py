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

import json
import logging
import re
from pathlib import Path
from typing import Any

from sdcluster import atomic
from sdcluster.generate.images import contact_sheet

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


def append_record(part: Path, record: dict[str, Any]) -> None:
    """One image's record, appended after its image is in place (see the module docstring)."""
    atomic.append_jsonl(part, record)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a part or of the manifest; a line a crash left incomplete is skipped."""
    return atomic.read_jsonl(Path(path))


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
    contact_sheet(image_files(out_dir), out_dir / CONTACT_SHEET)
    return out_dir / MANIFEST


def read_manifest(out_dir: Path) -> list[dict[str, Any]]:
    return read_records(Path(out_dir) / MANIFEST)
