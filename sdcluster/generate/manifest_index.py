"""The records of a folder's manifest parts, each image once in (prompt, image) order, without holding them.

A record is about a kilobyte of JSON (prompt, environment, the remake command); a 100,000-image run would
need hundreds of megabytes to merge its parts as dicts. The index keeps 20 bytes a record instead: the
(prompt index, image index) key parsed from the image's file name (the merge has always been keyed by file
name), the part it is in and the byte offset of its line. Records are read back from disk one at a time,
in key order, as the merge writes them out.

A part is appended in its shard's batch order, which is key order, except for the records a rerun re-adds
after a crash (``job._backfill_records``), which come first. So the keys are sorted, not trusted to be
sorted: one stable numpy sort of every part's index together, parts in name order, so that of two records
of one image (two shard counts wrote it) the first part's wins, as it always did.
"""

from __future__ import annotations

import json
import os
import re
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from sdcluster import atomic

_IMAGE_NAME = re.compile(r"^p(\d+)-i(\d+)\.png$")


def file_key(name: str) -> int | None:
    """``p0003-i0007.png`` -> one int64 that sorts like (prompt index, image index); None: not an image."""
    match = _IMAGE_NAME.match(name)
    return None if match is None else (int(match[1]) << 32) | int(match[2])


def keys_in(folder: Path) -> np.ndarray:
    """Sorted keys of the finished images in ``folder`` (temp files do not match the name pattern)."""
    found = array("q")
    if Path(folder).is_dir():
        with os.scandir(folder) as entries:
            for entry in entries:
                key = file_key(entry.name)
                if key is not None and entry.is_file():
                    found.append(key)
    return np.sort(np.frombuffer(found, dtype=np.int64)) if found else np.empty(0, dtype=np.int64)


def _index_part(path: Path, keys: array, offsets: array) -> None:
    """Append each record's key and byte offset; a torn line or one that names no image is skipped."""
    for start, record in atomic.iter_jsonl_at(path):
        key = file_key(str(record.get("file", "")))
        if key is not None:
            keys.append(key)
            offsets.append(start)


class PartIndex:
    """Every image recorded in ``parts`` once: sorted ``keys``, and where each record's line lies."""

    def __init__(self, parts: list[Path]) -> None:
        self.parts = list(parts)
        keys, offsets, part_of = array("q"), array("q"), array("i")
        for number, path in enumerate(self.parts):
            before = len(keys)
            _index_part(path, keys, offsets)
            part_of.extend([number] * (len(keys) - before))
        key_array = np.frombuffer(keys, dtype=np.int64) if keys else np.empty(0, dtype=np.int64)
        order = np.argsort(key_array, kind="stable")  # stable: ties stay in part order, the first part wins
        sorted_keys = key_array[order]
        first = np.ones(len(order), dtype=bool)
        first[1:] = sorted_keys[1:] != sorted_keys[:-1]
        chosen = order[first]
        self.keys = sorted_keys[first]
        self.part = np.frombuffer(part_of, dtype=np.int32)[chosen] if part_of else np.empty(0, np.int32)
        self.offset = np.frombuffer(offsets, dtype=np.int64)[chosen] if offsets else np.empty(0, np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    def keep(self, mask: np.ndarray) -> None:
        """Drop the records where ``mask`` is False (e.g. their image was deleted)."""
        self.keys, self.part, self.offset = self.keys[mask], self.part[mask], self.offset[mask]

    def records(self) -> Iterator[dict[str, Any]]:
        """The records in key order, read from their parts one line at a time.

        Not :func:`sdcluster.atomic.iter_jsonl`: the merge reads each record at the offset the index
        holds, in key order, jumping between parts, rather than streaming a file from its start; the line
        there was parsed once already, when it was indexed.
        """
        handles = [open(path, "rb") for path in self.parts]  # noqa: SIM115 - closed below, one per part
        try:
            for part, offset in zip(self.part.tolist(), self.offset.tolist(), strict=True):
                handle = handles[part]
                handle.seek(offset)
                yield json.loads(handle.readline())
        finally:
            for handle in handles:
                handle.close()


def contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """For each of ``keys``: is it in ``sorted_keys``? (``np.isin`` would sort both again.)"""
    if not len(sorted_keys):
        return np.zeros(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def image_name(prompt_index: int, image_index: int) -> str:
    """``p0003-i0007.png``: stable, sortable, free of prompt text (prompts can be long or unsafe in paths)."""
    return f"p{prompt_index:04d}-i{image_index:04d}.png"


def image_name_of(key: int) -> str:
    """The file name of a key (:func:`file_key` backwards)."""
    return image_name(key >> 32, key & 0xFFFFFFFF)
