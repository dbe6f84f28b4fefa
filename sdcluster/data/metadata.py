"""Write and check ``metadata.jsonl``, the caption file of a dataset folder.

The seed's data_format.py overwrote the file with empty captions on every run and nothing checked it, so a
typo in one line or one corrupt JPEG surfaced hours later inside a GPU job (``datasets`` silently drops images
that the file does not list, and only fails on a missing or broken image when a batch decodes it). Here
:func:`prepare` only adds what is missing and never loses a caption, and :func:`validate` reports every
problem at once, on the login node, each with the line and what to do about it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, TypeVar

from sdcluster import atomic
from sdcluster.data.reader import (
    METADATA_FILE,
    Problem,
    Row,
    is_image_name,
    is_utf8,
    normalize_name,
    parse_line,
    probe,
    scan,
    split_lines,
)

T = TypeVar("T")

NOT_DATA_FILE = ".sdcluster-not-data"
"""Paths of a folder that are not training data (one ``fnmatch`` pattern a line, ``dir/`` a whole folder),
e.g. a generation folder's contact sheet and split folders: not listed, so not flagged as uncaptioned.
Hidden, so ``datasets`` skips the file itself."""


class MetadataError(ValueError):
    """``metadata.jsonl`` cannot be read safely; rewriting it would lose lines, so we stop instead."""


@dataclass
class PrepareReport:
    """What :func:`prepare` did, so the CLI can tell the user which captions are still to write."""

    path: Path
    entries: int
    added: list[str] = field(default_factory=list)
    missing_caption: list[str] = field(default_factory=list)
    missing_file: list[str] = field(default_factory=list)
    bad_name: list[str] = field(default_factory=list)
    written: bool = False


def natural_key(name: str) -> tuple:
    """Sort ``11 (2).JPG`` before ``11 (10).JPG``: people number their photos, the file should follow."""
    parts = re.split(r"(\d+)", name.lower())
    return (tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name)


def _not_data(folder: Path) -> list[str]:
    path = folder / NOT_DATA_FILE
    lines = path.read_text().splitlines() if path.is_file() else []
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def list_images(folder: Path | str) -> list[str]:
    """Image files under ``folder`` as relative POSIX paths; hidden and ``__`` paths skipped like datasets,
    and those the folder's :data:`NOT_DATA_FILE` names."""
    folder = Path(folder)
    skip = _not_data(folder)
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith((".", "__")) for part in rel.parts):
            continue
        name = rel.as_posix()
        if any(fnmatch(name, p) or (p.endswith("/") and name.startswith(p)) for p in skip):
            continue
        if path.is_file() and is_image_name(path.name):
            found.append(rel.as_posix())
    return sorted(found, key=natural_key)


def read_metadata(folder: Path | str) -> list[dict]:
    """The entries of ``metadata.jsonl`` (an empty list if there is none); raise on any unreadable line."""
    path = Path(folder) / METADATA_FILE
    if not path.exists():
        return []
    entries = []
    for line, raw in split_lines(path.read_bytes()):
        entry, problem = parse_line(raw, line)
        if entry is not None and not isinstance(entry.get("file_name"), str):
            problem = Problem("no_file_name", 'no "file_name" string', line=line)
        if problem:
            raise MetadataError(
                f"{path.parent}: {problem}. Run `python -m sdcluster.data validate {path.parent}` for all"
            )
        entries.append(entry)
    return entries


def write_metadata(folder: Path | str, entries: Iterable[dict]) -> Path:
    """Write entries sorted by file name, atomically: a crash leaves the old file, never half a new one."""
    path = Path(folder) / METADATA_FILE
    ordered = sorted(entries, key=lambda e: natural_key(e["file_name"]))
    text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in ordered)
    atomic.write_text(path, text)
    return path


BAD_NAME = "its name is not valid UTF-8 (a file copied from an old archive?); rename the file"


def prepare(folder: Path | str, caption_column: str = "text") -> PrepareReport:
    """Make ``metadata.jsonl`` list every image: keep written captions, add new images with an empty one.

    Entries whose image is gone are kept (a hand-written caption is worth more than a tidy file) and
    reported; :func:`validate` flags them until the image is restored or the line deleted. Lines are read
    by the same reader as :func:`validate`; a line it cannot read raises :class:`MetadataError` naming it
    (rewriting the file would lose it). The file is rewritten only when its content changes.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images")
    old_path = folder / METADATA_FILE
    old_bytes = old_path.read_bytes() if old_path.exists() else None
    by_name: dict[str, dict] = {}
    for entry in read_metadata(folder):
        entry.setdefault(caption_column, "")
        first = by_name.setdefault(normalize_name(entry["file_name"]) or entry["file_name"], entry)
        if not first[caption_column] and entry[caption_column]:
            first[caption_column] = entry[caption_column]  # a duplicate line carried the real caption
    report = PrepareReport(path=old_path, entries=0)
    for name in list_images(folder):
        if not is_utf8(name):
            report.bad_name.append(name)
        elif name not in by_name:
            by_name[name] = {"file_name": name, caption_column: ""}
            report.added.append(name)
    entries = sorted(by_name.values(), key=lambda e: natural_key(e["file_name"]))
    report.entries = len(entries)
    report.missing_caption = [e["file_name"] for e in entries if not str(e[caption_column]).strip()]
    report.missing_file = [
        e["file_name"] for e in entries if probe(folder, e["file_name"])[0] in ("missing_file", "bad_name")
    ]
    new_bytes = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries).encode("utf-8")
    if new_bytes != old_bytes:
        write_metadata(folder, entries)
        report.written = True
    return report


def validate(
    folder: Path | str,
    max_pixels: int = 40_000_000,
    caption_column: str = "text",
    cache_root: Path | str | None = None,
    remember: bool = False,
) -> list[Problem]:
    """Every problem of a dataset folder, in file order, then the images the metadata does not list.

    It decodes every image completely, because a truncated JPEG opens fine and only fails on its pixels;
    with ``cache_root`` (the launch) not those that decoded cleanly before, unchanged since, and with
    ``remember`` (a launch that submits) recording those that do now (:func:`~sdcluster.data.reader.scan`).
    """
    return checked_rows(folder, max_pixels, caption_column, cache_root, remember)[1]


_Memo = dict[tuple, Any]
_read_once: contextvars.ContextVar[_Memo | None] = contextvars.ContextVar("_read_once", default=None)


@contextlib.contextmanager
def read_once() -> Iterator[None]:
    """Within it, a data folder is checked and pinned once for every config that reads it the same way: the
    points of a sweep share their data, and at 100,000 images a check costs about 10 s of the login node's
    time per point. Only around the checks one launch makes one after another; every launch reads afresh."""
    token = _read_once.set({})
    try:
        yield
    finally:
        _read_once.reset(token)


def once(key: tuple, compute: Callable[[], T]) -> T:
    """``compute()``, or within :func:`read_once` what it gave for ``key`` before (not to be mutated)."""
    memo = _read_once.get()
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]


def checked_rows(
    folder: Path | str,
    max_pixels: int = 40_000_000,
    caption_column: str = "text",
    cache_root: Path | str | None = None,
    remember: bool = False,
) -> tuple[list[Row], list[Problem]]:
    """:func:`validate`'s problems, and the rows it read (in file order): a launch whose check passes pins
    those rows (:mod:`~sdcluster.data.snapshot`) without reading the metadata again. Within
    :func:`read_once`, read once per folder and settings."""
    key = ("checked", os.path.abspath(folder), max_pixels, caption_column, str(cache_root), remember)
    return once(key, lambda: _checked_rows(Path(folder), max_pixels, caption_column, cache_root, remember))


def _checked_rows(
    folder: Path,
    max_pixels: int,
    caption_column: str,
    cache_root: Path | str | None,
    remember: bool,
) -> tuple[list[Row], list[Problem]]:
    rows, problems = scan(folder, caption_column, max_pixels, cache_root, remember)
    if any(p.kind in ("no_folder", "no_metadata") for p in problems):
        return rows, problems
    listed = {normalize_name(r.file_name) for r in rows} | {
        normalize_name(p.file_name) for p in problems if p.file_name is not None
    }
    if not listed and not problems:
        fix = f"list the images with `python -m sdcluster.data prepare {folder}` and write their captions"
        problems.append(Problem("empty", f"{METADATA_FILE} lists no images; {fix}"))
    for name in list_images(folder):
        if not is_utf8(name):
            problems.append(Problem("bad_name", BAD_NAME, name))
        elif name not in listed:
            msg = f"not listed in {METADATA_FILE}, so training ignores it; run prepare and write its caption"
            problems.append(Problem("unlisted", msg, name))
    return rows, problems


def listed_rows(
    folder: Path, caption_column: str = "text", clean: tuple[Path | str, int] | None = None
) -> list[Row]:
    """The rows of ``folder`` a job trains on, sorted by file name (:func:`load_captioned_images`, whose
    ``clean`` this is); raises naming the first problem that stops them."""
    if not (folder / METADATA_FILE).is_file():
        raise FileNotFoundError(
            f"{folder / METADATA_FILE} not found; run `python -m sdcluster.data prepare {folder}` and caption"
        )
    memo = {} if clean is None else {"cache_root": clean[0], "clean_under": clean[1]}
    rows, problems = scan(folder, caption_column, **memo)
    blocking = [p for p in problems if p.kind != "empty_caption"]  # "" is a caption the model can train on
    if blocking or not rows:
        first = blocking[0] if blocking else f"{METADATA_FILE} lists no images"
        raise MetadataError(
            f"{folder}: {len(blocking) or 1} problem(s), the first: {first}. "
            f"Run `python -m sdcluster.data validate {folder}` for all of them"
        )
    rows.sort(key=lambda row: natural_key(row.file_name))
    return rows
