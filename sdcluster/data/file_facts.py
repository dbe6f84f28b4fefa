"""What the latent cache and the buckets need of each image file (its sha256 and upright size), read once
per version of the file and kept in an index beside the cache.

Every job start used to hash every training image (the cache key holds each file's bytes) and open every
header (the crops, the buckets): at 100,000 images that is a read of the whole dataset before step 1, in
every process of every task. A file's facts change only when the file does, so they are kept per folder in
``<cache_root>/image_facts/<folder hash>.json``, keyed by name with the file's size and modification time
(nanoseconds), the test ``make`` and ``rsync`` use: a start then stats each file and reads only the ones
whose stat changed. A file rewritten in place within the same nanosecond and at the same size would keep
its old facts; nothing in sdcluster writes images in place (generation writes a new file and renames it).

The index is a cache: written atomically (a new file renamed over the old) by whichever process computed
something new, never trusted beyond the stat that keys each entry, and safe to delete.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sdcluster import atomic
from sdcluster.identity import stable_hash

log = logging.getLogger("sdcluster")

INDEX_VERSION = 1


@dataclass(frozen=True)
class Facts:
    """One image file's sha256 and its ``(width, height)`` once EXIF rotation is applied."""

    sha256: str
    upright: tuple[int, int]


def index_file(cache_root: Path | str, folder: Path) -> Path:
    """The index of ``folder``'s images (its absolute path names it: each dataset folder has its own)."""
    return Path(cache_root) / "image_facts" / f"{stable_hash(str(folder.resolve()), 16)}.json"


def stamp(stat: os.stat_result) -> list[int]:
    """What says a file is the version an index entry was made from: its size and modification time in
    nanoseconds (the facts index and the decoded-images memo both key their entries by it)."""
    return [stat.st_size, stat.st_mtime_ns]


def _read(index: Path) -> dict[str, list]:
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != INDEX_VERSION:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def facts_of(paths: Sequence[Path], cache_root: Path | str | None) -> list[Facts]:
    """The facts of each file of ``paths`` (in order), from the index of its folder where its stat still
    matches, else read from the file (and the index rewritten). ``cache_root`` None: no index, all read."""
    from sdcluster.data.buckets import upright_size

    by_folder: dict[Path, dict[str, list]] = {}
    changed: set[Path] = set()
    out: list[Facts] = []
    for path in paths:
        folder = path.parent
        if folder not in by_folder:
            by_folder[folder] = _read(index_file(cache_root, folder)) if cache_root else {}
        known = by_folder[folder]
        now = stamp(os.stat(path))
        entry = known.get(path.name)
        if entry is None or entry[:2] != now:
            entry = [*now, atomic.file_sha256(path), *upright_size(path)]
            known[path.name] = entry
            changed.add(folder)
        out.append(Facts(entry[2], (entry[3], entry[4])))
    for folder in changed if cache_root else ():
        index = index_file(cache_root, folder)
        try:
            index.parent.mkdir(parents=True, exist_ok=True)
            record = {"version": INDEX_VERSION, "folder": str(folder), "files": by_folder[folder]}
            atomic.write_text(index, json.dumps(record, separators=(",", ":")))
        except OSError as err:  # a read-only cache root: the facts were read all the same
            log.warning(
                "image facts index %s not written (%s): the next start reads the images again", index, err
            )
    return out


class DecodedMemo:
    """Which versions of a dataset folder's images decoded in full without a problem, under which
    ``data.max_pixels``: what lets a launch's data check skip decoding them again.

    Decoding every image is the whole cost of the check a launch makes before anything is queued (30 s at
    100,000 images on 2 cores, at every launch of every sweep member). A file that decoded cleanly and has
    not changed since (same size and modification time in nanoseconds, as for the facts above) decodes
    cleanly again, so only new or changed files are decoded. Recorded by each launch that submits (a dry
    run only reads it: it writes nothing). Kept in ``<cache_root>/image_facts/<folder
    hash>.decoded.json``, keyed by the name in the folder, for one ``max_pixels`` (another limit starts
    afresh: a file under one limit can be over another). ``python -m sdcluster.data validate DIR`` keeps
    no memo and decodes every image, for a user who wants every byte checked.
    """

    def __init__(self, cache_root: Path | str, folder: Path, max_pixels: int) -> None:
        self.path = index_file(cache_root, folder).with_suffix(".decoded.json")
        self.folder, self.max_pixels = folder, max_pixels
        self.files: dict[str, list[int]] = {}
        self._added = False
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if (
            isinstance(data, dict)
            and data.get("version") == INDEX_VERSION
            and data.get("max_pixels") == max_pixels
        ):
            files = data.get("files")
            self.files = files if isinstance(files, dict) else {}

    @staticmethod
    def _stamp(path: Path) -> list[int] | None:
        try:
            return stamp(os.stat(path))
        except OSError:
            return None

    def known(self, path: Path) -> bool:
        """``path`` decoded cleanly before, and its stat says it is the same file."""
        try:
            info = os.stat(path)
        except OSError:
            return False
        return self.known_stat(path.relative_to(self.folder).as_posix(), info)

    def known_stat(self, name: str, info: os.stat_result) -> bool:
        """:meth:`known` of the file ``name`` (its normalized path in the folder), with its stat already at
        hand: a job's start stats each file once, and builds no path objects for it (100,000 of them)."""
        return self.files.get(name) == stamp(info)

    def remember(self, paths: Sequence[Path]) -> None:
        """Record ``paths`` as decoded cleanly (their stat now)."""
        for path in paths:
            stamp = self._stamp(path)
            if stamp is not None:
                self.files[path.relative_to(self.folder).as_posix()] = stamp
                self._added = True

    def save(self) -> None:
        """Write the memo (atomically) if anything was added; a read-only cache root only costs a decode."""
        if not self._added:
            return
        record = {"version": INDEX_VERSION, "max_pixels": self.max_pixels, "files": self.files}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.path, json.dumps(record, separators=(",", ":")))
        except OSError as err:
            log.warning(
                "decoded-images memo %s not written (%s): the next launch decodes them again", self.path, err
            )
