"""A finished generation folder as a dataset: ``metadata.jsonl`` for imagefolder, optional train/validation.

Called by :func:`sdcluster.generate.records.merge_image_manifest` after the manifest is written, so the folder
loads with ``datasets.load_dataset("imagefolder", data_dir=FOLDER)`` (columns ``image``, ``text`` = the
prompt, ``template`` and one per slot of the prompts program) and trains as it is with
``data=imagefolder data.path=FOLDER``. Files that are not data (the contact sheet, the split folders, images
set aside in ``rejected/``) are named in the folder's :data:`~sdcluster.data.metadata.NOT_DATA_FILE`, so
sdcluster's data checks do not take them for uncaptioned images.

With ``generate.split`` the images are also written to ``train/`` and ``validation/`` (hard links, or copies
across file systems; the originals stay where they are), each with its own ``metadata.jsonl``: datasets'
imagefolder reads those folder names as splits. Each split folder is built beside its place and renamed in,
so a reader sees the old split or the new one, never half of one.
"""

from __future__ import annotations

import errno
import filecmp
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from sdcluster import atomic
from sdcluster.data.metadata import METADATA_FILE, NOT_DATA_FILE
from sdcluster.derive import derive_unit

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
NOT_DATA = ("contact_sheet.png", "train/", "validation/", "rejected/", "gallery/")
"""What :data:`NOT_DATA_FILE` lists: a generation folder's files that are not images to train on."""


def slot_names(records: Iterable[dict[str, Any]]) -> list[str]:
    """Every slot any record has, in first-seen order (bounded by the prompt program, not the images)."""
    slots: dict[str, None] = {}
    for record in records:
        slots.update(dict.fromkeys(record.get("labels") or {}))
    return list(slots)


def dataset_row(record: dict[str, Any], slots: list[str]) -> dict[str, Any]:
    """One imagefolder row: ``file_name``, ``text``, ``template``, then every slot.

    Every row has every slot of the folder, ``""`` where its template does not use the slot: datasets
    infers each metadata file's column types from its first rows, and a slot that is null there would be
    typed null in one split and string in the other, which it refuses to load together.
    """
    labels = record.get("labels") or {}
    row = {"file_name": record["file"], "text": record["prompt"], "template": record.get("template_index")}
    return row | {slot: labels.get(slot, "") for slot in slots}


def dataset_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a list of records (see :func:`dataset_row`)."""
    slots = slot_names(records)
    return [dataset_row(record, slots) for record in records]


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]], mode: int, ascii_sorted: bool = False) -> None:
    """Stream ``rows`` into a temporary file beside ``path``, fsync, rename over it.

    :func:`sdcluster.atomic.write_bytes` would need the whole text in memory first; a folder of 100,000
    images has as many lines. ``mode`` is taken from a file atomic wrote, so the user's umask applies. An
    unchanged file is left alone: datasets keys its cache of a folder on the metadata file's time.
    ``ascii_sorted``: keys sorted, non-ASCII escaped, as the manifest has always been written.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=ascii_sorted, sort_keys=ascii_sorted) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if path.is_file() and filecmp.cmp(tmp, path, shallow=False):
            Path(tmp).unlink()
            return
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def split_of(row: dict[str, Any], split: dict[str, Any]) -> str:
    """``train`` or ``validation`` for one row; by fraction, a hash of (seed, file), so adding images or
    shards never moves one that was already assigned."""
    if split["by"] == "slot":
        return "validation" if row.get(split["slot"]) in split["validation"] else "train"
    unit = derive_unit("sdcluster-split", split["seed"], row["file_name"])
    return "validation" if unit < split["fraction"] else "train"


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)
    except OSError as err:  # another file system, or one without hard links: a copy, never a move
        if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copy2(source, dest)


def _write_split(out_dir: Path, name: str, rows: Iterable[dict[str, Any]], mode: int) -> int:
    """Build ``name/`` beside its place from ``rows`` and rename it in; return its row count (0: none
    built)."""
    staging = atomic.staging_dir(out_dir / name)
    count = 0

    def linked() -> Iterator[dict[str, Any]]:
        nonlocal count
        for row in rows:
            _link_or_copy(out_dir / row["file_name"], staging / row["file_name"])
            count += 1
            yield row

    try:
        write_jsonl(staging / METADATA_FILE, linked(), mode)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not count:
        shutil.rmtree(staging, ignore_errors=True)
        return 0
    atomic.publish_dir(staging, out_dir / name)
    return count


def _split_settings(settings_path: Path) -> dict[str, Any] | None:
    if not settings_path.is_file():
        return None
    split = json.loads(settings_path.read_text()).get("split") or {}
    return split if split.get("by", "none") != "none" else None


def export_dataset(
    out_dir: Path,
    records: Callable[[], Iterable[dict[str, Any]]],
    settings_path: Path,
    slots: list[str] | None = None,
) -> None:
    """Write ``metadata.jsonl`` (and the split folders ``settings.json`` asks for) from the merged records.

    ``records()`` gives the records afresh for each pass (the merge reads them from ``manifest.jsonl``): one
    pass for the slot names, one for ``metadata.jsonl``, one per split, so memory stays flat in the number
    of images. ``slots``: :func:`slot_names` of the records when the caller saw them go by (saves a pass).
    """
    out_dir = Path(out_dir)
    manifest_mode = (out_dir / "manifest.jsonl").stat().st_mode & 0o777
    if slots is None:
        slots = slot_names(records())

    def rows() -> Iterator[dict[str, Any]]:
        # Only images in the folder itself: the manifest also lists those generate.filter set aside.
        return (dataset_row(r, slots) for r in records() if (out_dir / r["file"]).is_file())

    write_jsonl(out_dir / METADATA_FILE, rows(), manifest_mode)
    listed = "# Not training data: written by sdcluster's generation merge\n" + "\n".join(NOT_DATA) + "\n"
    atomic.write_bytes(out_dir / NOT_DATA_FILE, listed.encode(), mode=manifest_mode)
    split = _split_settings(settings_path)
    if split is None:
        for name in SPLITS:  # a split given up: its folders hold only links or copies, nothing is lost
            if (out_dir / name / METADATA_FILE).is_file():
                shutil.rmtree(out_dir / name)
        return
    for name in SPLITS:
        part = (row for row in rows() if split_of(row, split) == name)
        if not _write_split(out_dir, name, part, manifest_mode):
            log.warning(
                "generate.split %s leaves %s/ empty; imagefolder will not list that split", split, name
            )
            shutil.rmtree(out_dir / name, ignore_errors=True)
