"""The files of a generation folder: images written atomically, per-shard manifest parts, the merged image
manifest.

Layout of one generation folder (see :func:`sdcluster.paths.generation_dir`)::

    p0000-i0000.png ...                     one image per (prompt index, image index), its record inside
    settings.json                           the generate settings and prompts that made this folder
    manifest.parts/shard-<i>-of-<n>.jsonl   appended by each shard: one JSON record per image it wrote
    manifest.jsonl                          the image manifest, merged: every image on disk once, in order
    contact_sheet.png                       kept images as thumbnails in one grid (sampled per group at scale)
    rejected/                               images set aside by generate.filter, reasons.jsonl (see filter.py)
    gallery/index.html                      static pages: thumbnails, prompts, seeds, scores (gallery.py)

Shards never write the same file: each owns its part and its images, so array tasks need no locking. An image
is renamed into place before its record is appended, so a record always points at a complete image; a crash
in between leaves an image without a record, which the next run of that generation job re-adds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from sdcluster import atomic
from sdcluster.config.generate import GenerateConfig
from sdcluster.generate import filter as rejects
from sdcluster.generate import gallery, scores
from sdcluster.generate.dataset_export import export_dataset, write_jsonl
from sdcluster.generate.images import contact_sheet, sample_per_group
from sdcluster.generate.manifest_index import PartIndex, contains, image_name_of, keys_in
from sdcluster.generate.manifest_index import image_name as image_name  # the job and tests name images here

log = logging.getLogger(__name__)

PARTS_DIR = "manifest.parts"
IMAGE_MANIFEST = "manifest.jsonl"
"""The image manifest: one record per image (not a checkpoint's or a latent-cache entry's manifest)."""
SETTINGS = "settings.json"
CONTACT_SHEET = "contact_sheet.png"


def part_path(out_dir: Path, index: int, count: int) -> Path:
    return Path(out_dir) / PARTS_DIR / f"shard-{index}-of-{count}.jsonl"


def append_record(part: Path, record: dict[str, Any]) -> None:
    """One image's record, appended after its image is in place (see the module docstring)."""
    atomic.append_jsonl(part, record)


def part_files(out_dir: Path) -> list[Path]:
    return sorted((Path(out_dir) / PARTS_DIR).glob("shard-*.jsonl"))


def recorded_keys(out_dir: Path) -> np.ndarray:
    """Sorted keys (:func:`~sdcluster.generate.manifest_index.file_key`) of the images with a record in any
    part, whichever shard count wrote it: 8 bytes an image where a set of names would take ~70."""
    return PartIndex(part_files(out_dir)).keys


def recorded_files(out_dir: Path) -> set[str]:
    """Names of the images that have a record in any part (a set: for small folders and tests)."""
    return {image_name_of(key) for key in recorded_keys(out_dir).tolist()}


def image_files(out_dir: Path) -> list[Path]:
    """The finished images of a folder, in (prompt index, image index) order; temp files are not matched."""
    return [Path(out_dir) / image_name_of(key) for key in keys_in(out_dir).tolist()]


def merge_image_manifest(
    out_dir: Path, gen: GenerateConfig | None = None, cache_root: Path | str | None = None
) -> Path:
    """Merge every part into ``manifest.jsonl`` (each image on disk once, sorted); redraw the contact sheet.

    Records whose image was deleted are dropped and images without a record are reported, so the manifest
    always describes exactly the images that are there. Then scores missing from records are filled in,
    ``gen.filter`` sets images aside and the gallery is rewritten; ``gen`` is the job's generate settings
    (a merge by hand uses the folder's ``settings.json``), ``cache_root`` where a CLIP model is found.

    Streaming: the parts are indexed (20 bytes a record, :mod:`~sdcluster.generate.manifest_index`), and the
    records flow one at a time from the parts through scoring and the filter into ``manifest.jsonl``; the
    dataset export, the contact sheet and the gallery then read that file line by line.
    """
    out_dir = Path(out_dir)
    parts = part_files(out_dir)
    if not parts:
        raise FileNotFoundError(
            f"no manifest parts in {out_dir / PARTS_DIR}: not a generation folder, or no shard wrote yet"
        )
    index = PartIndex(parts)
    on_disk = np.union1d(keys_in(out_dir), keys_in(out_dir / rejects.REJECTED))
    index.keep(contains(on_disk, index.keys))
    gen = gen or rejects.folder_settings(out_dir)  # a merge by hand: the settings the folder was made with
    locate = partial(rejects.locate, out_dir)
    stream = scores.fill_missing(out_dir, index.records(), locate, gen, cache_root)
    stream = rejects.apply(out_dir, stream, gen)  # marks (and moves) rejects: nothing is deleted
    manifest = out_dir / IMAGE_MANIFEST
    # the parts are plain appends, so their permissions are the user's umask
    mode = (manifest if manifest.exists() else parts[0]).stat().st_mode & 0o777
    tally = _Tally()
    write_jsonl(manifest, tally.count(stream), mode, ascii_sorted=True)
    export_dataset(out_dir, partial(stream_image_manifest, out_dir), out_dir / SETTINGS, list(tally.slots))
    unrecorded = on_disk[~contains(index.keys, on_disk)]
    if len(unrecorded):
        log.warning(
            "%d images have no record (e.g. %s); rerun the generation job to re-add them",
            len(unrecorded),
            image_name_of(int(unrecorded[0])),
        )
    kept = partial(_kept_tiles, out_dir)
    contact_sheet(sample_per_group(kept, sizes=tally.groups), out_dir / CONTACT_SHEET)
    gallery.write_gallery(out_dir)
    return manifest


class _Tally:
    """What the dataset export and the contact sheet would otherwise read the manifest once more for:
    slot names and kept images per group, counted as the records go into the manifest (bounded by the
    prompt program, not by the images)."""

    def __init__(self) -> None:
        self.slots: dict[str, None] = {}
        self.groups: dict[str, int] = {}

    def count(self, stream: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for record in stream:
            self.slots.update(dict.fromkeys(record.get("labels") or {}))
            if "rejected" not in record:
                key = gallery.group_key(record)
                self.groups[key] = self.groups.get(key, 0) + 1
            yield record


def _kept_tiles(out_dir: Path) -> Iterator[tuple[str, Path]]:
    kept = (r for r in stream_image_manifest(out_dir) if "rejected" not in r)
    return ((gallery.group_key(r), out_dir / r["file"]) for r in kept)


def stream_image_manifest(out_dir: Path) -> Iterator[dict[str, Any]]:
    """The merged records one line at a time (what :func:`read_image_manifest` returns as a list)."""
    return gallery.image_records(Path(out_dir) / IMAGE_MANIFEST)


def read_image_manifest(out_dir: Path) -> list[dict[str, Any]]:
    """The merged records as a list (small folders and tests; :func:`stream_image_manifest` at scale)."""
    return list(stream_image_manifest(out_dir))
