"""What a launch checked of the training data, pinned for its jobs: each row's file, caption, sha256 and
upright size, in the order the job numbers its rows.

At 100,000 images a job's start spent about 9 s finding again what its launch had established minutes or
hours before: every metadata line parsed, every image stat-ed and lstat-ed, the ``datasets`` table built, the
image-facts index read and every image stat-ed once more, all to know the rows and the latent-cache key. The
launch now writes that view once, to ``<cache_root>/data_snapshots/<digest>.json`` (the digest is the sha256
of the file's bytes), and pins the digest in ``data.snapshot``, as it pins a hub dataset to its commit.

* A job whose latent-cache entry is complete reads the snapshot and the entry's manifest, and nothing of the
  data folder: its start grows with the images only by those two reads.
* A job that reads images (it builds the cache, trains without one, or measures the held-out loss) reads only
  the files the snapshot lists, each checked as the reader checks it (name, stat, format, symlinks) and its
  sha256 compared with the snapshot's (:meth:`SnapshotRows.table`): an image changed since the launch stops
  the job with its name and the fix, so no job trains on other bytes than its cache key and records say.
* So a run trains on what its launch checked even when the folder changes while the job waits in the queue
  or between requeues; lines added to the metadata meanwhile are the next launch's.
* A snapshot file that is gone or damaged (a cleaned cache root) is said in the log; the job then reads the
  folder as before and checks that it still holds what the launch pinned.

A job without ``data.snapshot`` (a config composed and run without a launch: tests, notebooks) reads the
folder at its start, as it always has.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import weakref
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdcluster import atomic
from sdcluster.config import Config
from sdcluster.data.file_facts import DecodedMemo, Facts, facts_of
from sdcluster.data.metadata import MetadataError, listed_rows, natural_key, once
from sdcluster.data.reader import Row, listed_file_problem
from sdcluster.data.sources import SOURCE_COLUMN, column, counts_of, image_files, sources_of
from sdcluster.paths import data_snapshot_file

log = logging.getLogger("sdcluster")

SNAPSHOT_VERSION = 1
DIGEST_LENGTH = 32
"""Hex digits of the sha256 that ``data.snapshot`` holds: 128 bits, so no other file can be made to match
(the cache root may be shared; a snapshot is trusted only when its bytes hash to the pinned digest)."""
SHOWN = 5  # changed images a message names


class DataChangedError(MetadataError):
    """The data is not what the launch pinned: training on it would break the cache key and the records."""


@dataclass
class Snapshot:
    """Every row a run's table has (held-out ones included), source after source, each source's rows
    sorted by file name (:func:`~sdcluster.data.metadata.listed_rows`)."""

    folders: list[str]  # each source's folder, absolute
    counts: list[int]  # rows of each source
    names: list[str]  # each row's file in its source's folder
    captions: list[str]
    sha256: list[str]
    upright: list[tuple[int, int]]  # (width, height) once EXIF rotation is applied
    _digest: str | None = field(default=None, repr=False, compare=False)

    def to_bytes(self) -> bytes:
        record = {
            "version": SNAPSHOT_VERSION,
            "folders": self.folders,
            "counts": self.counts,
            "names": self.names,
            "captions": self.captions,
            "sha256": self.sha256,
            "upright": self.upright,
        }
        return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = _digest_of(self.to_bytes())
        return self._digest

    @classmethod
    def from_bytes(cls, data: bytes) -> Snapshot:
        record = json.loads(data)
        if record.get("version") != SNAPSHOT_VERSION:
            raise ValueError(f"snapshot version {record.get('version')}, expected {SNAPSHOT_VERSION}")
        upright = [(int(w), int(h)) for w, h in record["upright"]]
        keys = ("folders", "counts", "names", "captions", "sha256")
        return cls(**{key: record[key] for key in keys}, upright=upright, _digest=_digest_of(data))

    def source_of_rows(self) -> list[int]:
        """Each row's source (its place in ``folders``)."""
        return [source for source, count in enumerate(self.counts) for _ in range(count)]

    def path(self, row: int, sources: Sequence[int]) -> Path:
        return Path(self.folders[sources[row]]) / self.names[row]


def _digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:DIGEST_LENGTH]


def take(cfg: Config, scanned: Sequence[Sequence[Row] | None] | None = None) -> Snapshot:
    """The snapshot of ``cfg``'s sources as they are now: the rows a job reads and each image's facts (from
    the facts index, where a file's stat still matches it). ``scanned``: each source's rows as the launch's
    check just read them, without a problem (else read here, the images that decoded cleanly at this launch
    not opened again)."""
    clean = (cfg.cache_root, cfg.data.max_pixels)
    folders, counts, names, captions, files = [], [], [], [], []
    for index, source in enumerate(sources_of(cfg.data)):
        folder = Path(source.path)
        read = scanned[index] if scanned is not None else None
        if read is None:
            rows = listed_rows(folder, source.caption_column, clean)
        else:  # as listed_rows orders them
            rows = sorted(read, key=lambda row: natural_key(row.file_name))
        folders.append(os.path.abspath(folder))
        counts.append(len(rows))
        names += [row.file_name for row in rows]
        captions += [row.caption for row in rows]
        files += [folder / row.file_name for row in rows]
    return _with_facts(folders, counts, names, captions, facts_of(files, cfg.cache_root))


def _with_facts(
    folders: list[str], counts: list[int], names: list[str], captions: list[str], facts: list[Facts]
) -> Snapshot:
    sha256 = [fact.sha256 for fact in facts]
    return Snapshot(folders, counts, names, captions, sha256, [fact.upright for fact in facts])


def of_table(cfg: Config, table: Any) -> Snapshot:
    """The snapshot of a table :func:`~sdcluster.data.sources.load_rows` read (the same rows as :func:`take`
    finds in the same folders)."""
    folders = [os.path.abspath(source.path) for source in sources_of(cfg.data)]
    names = column(table, "file_name")
    captions = column(table, cfg.data.caption_column)
    facts = facts_of(image_files(cfg, table), cfg.cache_root)
    return _with_facts(folders, counts_of(cfg, table), names, captions, facts)


_loaded: weakref.WeakValueDictionary[Path, Snapshot] = weakref.WeakValueDictionary()
"""Each snapshot file read, while something holds it (the loader's rows): not for the whole job, which would
keep 40 MB of names, captions and hashes at 100,000 images; validation reads it again (0.15 s)."""
_said: set[str] = set()  # the digests this process's launch has said
_told: set[Path] = set()  # the snapshots this process's job has said it reads


def pin(
    cfg: Config,
    scanned: Sequence[Sequence[Row] | None] | None = None,
    say: Callable[[str], None] = print,
) -> Config:
    """``cfg`` with ``data.snapshot`` set to the digest of its data as the launch checked it (``scanned``:
    :func:`take`'s), the snapshot written (``cfg`` itself is left as it is). A cache root this user cannot
    write leaves it unpinned, said in one line: the jobs then read the folder at their start."""
    sources = tuple((os.path.abspath(s.path), s.caption_column) for s in sources_of(cfg.data))
    key = ("snapshot", sources, str(cfg.cache_root), cfg.data.max_pixels)
    snapshot = once(key, lambda: take(cfg, scanned))  # a sweep's points: taken once (read_once)
    data = snapshot.to_bytes()
    path = data_snapshot_file(cfg.cache_root, snapshot.digest)
    try:
        if not path.is_file() or path.read_bytes() != data:  # a damaged copy is replaced
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(path, data)
    except OSError as err:
        say(f"data.snapshot: not written ({err}); the jobs read the data folder at their start")
        return cfg
    if snapshot.digest not in _said:  # a sweep's points pin the same data: one line for all of them
        _said.add(snapshot.digest)
        say(
            f"data: {len(snapshot.names)} images pinned as data.snapshot={snapshot.digest} (names, captions "
            f"and sha256, in {path}): the jobs train on exactly these"
        )
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, snapshot=snapshot.digest))


def load(cfg: Config) -> Snapshot | None:
    """The snapshot ``data.snapshot`` pins, or None (said in a warning) when its file is gone or its bytes
    are not the pinned ones."""
    assert cfg.data.snapshot
    path = data_snapshot_file(cfg.cache_root, cfg.data.snapshot)
    held = _loaded.get(path)
    if held is not None:
        return held
    why = None
    try:
        data = path.read_bytes()
        if _digest_of(data) != cfg.data.snapshot:
            why = "its bytes do not hash to the pinned digest"
        else:
            _loaded[path] = snapshot = Snapshot.from_bytes(data)
            if path not in _told:  # once a job, not at every validation
                _told.add(path)
                log.info(
                    "data: %d images as the launch pinned them (data.snapshot=%s); images are read only to "
                    "encode them, each checked against it",
                    len(snapshot.names),
                    cfg.data.snapshot,
                )
            return snapshot
    except (OSError, ValueError, KeyError, TypeError) as err:
        why = f"{type(err).__name__}: {err}"
    log.warning(
        "data.snapshot=%s: %s cannot be used (%s); reading the data folder instead, and checking it still "
        "holds what the launch pinned",
        cfg.data.snapshot,
        path,
        why,
    )
    return None


def rows(cfg: Config) -> SnapshotRows | None:
    """Every row of the pinned data (held-out ones included), or None without ``data.snapshot``. Raises
    :class:`DataChangedError` when the snapshot file is unusable and the folder no longer holds the data
    it pinned."""
    if not cfg.data.snapshot:
        return None
    snapshot = load(cfg)
    if snapshot is not None:
        return SnapshotRows(snapshot, cfg.data.caption_column, bool(cfg.data.sources))
    from sdcluster.data.sources import load_rows
    from sdcluster.paths import datasets_cache

    table = load_rows(cfg, datasets_cache(cfg))
    found = of_table(cfg, table)
    if found.digest != cfg.data.snapshot:
        raise DataChangedError(
            f"data.snapshot={cfg.data.snapshot}: the data is not what the launch pinned any more "
            f"({', '.join(found.folders)} now list {len(found.names)} images; some were added, removed or "
            "changed). Launch again: it checks the data as it is now and pins that"
        )
    return SnapshotRows(found, cfg.data.caption_column, bool(cfg.data.sources), table=table)


class SnapshotRows:
    """A selection of a snapshot's rows, with what the loader, the cache plan and validation read of a
    ``datasets`` table (``len``, ``select``, columns by name), and each row's facts; the images themselves
    only through :meth:`table`, which checks them."""

    def __init__(
        self,
        snapshot: Snapshot,
        caption_column: str,
        with_sources: bool,
        indices: list[int] | None = None,
        table: Any = None,
    ) -> None:
        self.snapshot = snapshot
        self.caption_column = caption_column
        self.with_sources = with_sources  # a data.sources run: the source column, as load_rows adds it
        self.indices = list(range(len(snapshot.names))) if indices is None else indices
        self._table = table  # every row as a datasets table, read and checked already (a fallback read)
        self._sources: list[int] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def column_names(self) -> list[str]:
        return ["file_name", self.caption_column, *([SOURCE_COLUMN] if self.with_sources else [])]

    def _row_sources(self) -> list[int]:
        if self._sources is None:
            self._sources = self.snapshot.source_of_rows()
        return self._sources

    def __getitem__(self, name: str) -> list[Any]:
        snap = self.snapshot
        if name == "file_name":
            return [snap.names[i] for i in self.indices]
        if name == self.caption_column:
            return [snap.captions[i] for i in self.indices]
        if name == SOURCE_COLUMN and self.with_sources:
            sources = self._row_sources()
            return [sources[i] for i in self.indices]
        raise KeyError(f"{name!r}: a snapshot's columns are {self.column_names}")

    def select(self, indices: Sequence[int]) -> SnapshotRows:
        chosen = [self.indices[i] for i in indices]
        selected = SnapshotRows(self.snapshot, self.caption_column, self.with_sources, chosen, self._table)
        selected._sources = self._sources
        return selected

    def facts(self) -> tuple[list[str], list[tuple[int, int]]]:
        """Each row's sha256 and each row's upright size, as the launch found them (no file is read)."""
        snap = self.snapshot
        return [snap.sha256[i] for i in self.indices], [snap.upright[i] for i in self.indices]

    def table(self, cfg: Config) -> Any:
        """These rows as a ``datasets`` table with their images, once each file passes the reader's checks
        and still has the sha256 the launch pinned; raises :class:`DataChangedError` naming the files that
        do not (and the fix)."""
        if self._table is not None:
            return self._table.select(self.indices)
        from sdcluster.data.dataset import rows_table
        from sdcluster.paths import datasets_cache

        snap, sources = self.snapshot, self._row_sources()
        memos: dict[int, tuple[Path, DecodedMemo]] = {}
        bad: list[str] = []
        for i in self.indices:
            source = sources[i]
            if source not in memos:
                folder = Path(snap.folders[source])
                memos[source] = (folder.resolve(), DecodedMemo(cfg.cache_root, folder, cfg.data.max_pixels))
            root, memo = memos[source]
            problem = listed_file_problem(Path(snap.folders[source]), root, snap.names[i], memo)
            if problem is not None:
                bad.append(f"{snap.path(i, sources)}: {problem[1]}")
        paths = [snap.path(i, sources) for i in self.indices]
        if not bad:  # a file that failed a check above may not even exist: no facts for it
            facts = facts_of(paths, cfg.cache_root)
            bad = [
                f"{path}: its content changed (sha256 {fact.sha256[:12]}, pinned {snap.sha256[i][:12]})"
                for path, fact, i in zip(paths, facts, self.indices, strict=True)
                if fact.sha256 != snap.sha256[i]
            ]
        if bad:
            more = f" (and {len(bad) - SHOWN} more)" if len(bad) > SHOWN else ""
            raise DataChangedError(
                f"data.snapshot={snap.digest}: {len(bad)} image(s) are not what the launch pinned: "
                + "; ".join(bad[:SHOWN])
                + f"{more}. Put them back, or launch again: it checks the data as it is now and pins that"
            )
        images, captions = [str(path) for path in paths], self[self.caption_column]
        cache = datasets_cache(cfg)
        table = rows_table(
            images, self["file_name"], captions, self.caption_column, cache, self._fingerprint()
        )
        if self.with_sources:
            table = table.add_column(SOURCE_COLUMN, self[SOURCE_COLUMN])
        return table

    def _fingerprint(self) -> str:
        """What names the table of these rows in ``datasets``' cache: the snapshot (folders, names and
        captions), the caption column and the selection."""
        selection = hashlib.sha256(array("q", self.indices).tobytes()).hexdigest()
        rows = _digest_of(f"{self.caption_column}/{selection}".encode())
        return f"sdcluster-snapshot-{self.snapshot.digest}-{rows}"


def readable(cfg: Config, rows: Any) -> Any:
    """``rows`` as a ``datasets`` table whose images can be read: a snapshot's, checked
    (:meth:`SnapshotRows.table`); a table as it is."""
    return rows.table(cfg) if isinstance(rows, SnapshotRows) else rows


def row_facts(cfg: Config, rows: Any) -> tuple[list[str], list[tuple[int, int]]]:
    """Each row's sha256 and each row's upright size (two lists, not 100,000 :class:`Facts`: 0.4 s at a
    start): a snapshot's as pinned, a table's from the facts index (a stat per image)."""
    if isinstance(rows, SnapshotRows):
        return rows.facts()
    facts = facts_of(image_files(cfg, rows), cfg.cache_root)
    return [fact.sha256 for fact in facts], [fact.upright for fact in facts]
