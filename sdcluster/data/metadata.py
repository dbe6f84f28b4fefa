"""Write and check ``metadata.jsonl``, the caption file of an imagefolder dataset.

The seed's data_format.py overwrote the file with empty captions on every run and nothing checked it, so a
typo in one line or one corrupt JPEG surfaced hours later inside a GPU job (``datasets`` silently drops images
that the file does not list, and only fails on a missing or broken image when a batch decodes it). Here
:func:`prepare` only adds what is missing and never loses a caption, and :func:`validate` reports every
problem at once, on the login node, each with the line and what to do about it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from sdcluster import atomic
from sdcluster.data.image_checks import check_image

METADATA_FILE = "metadata.jsonl"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
NOT_DATA_FILE = ".sdcluster-not-data"
"""Paths of a folder that are not training data (one ``fnmatch`` pattern a line, ``dir/`` a whole folder),
e.g. a generation folder's contact sheet and split folders: not listed, so not flagged as uncaptioned.
Hidden, so ``datasets`` skips the file itself."""


class MetadataError(ValueError):
    """``metadata.jsonl`` cannot be read safely; rewriting it would lose lines, so we stop instead."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset folder.

    ``kind`` is a stable code that programs and tests match on; ``message`` says what to do, for people.
    """

    kind: str
    message: str
    file_name: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        where = [f"{METADATA_FILE} line {self.line}"] if self.line is not None else []
        where += [repr(self.file_name)] if self.file_name is not None else []
        return ": ".join([*where, self.message])


@dataclass
class PrepareReport:
    """What :func:`prepare` did, so the CLI can tell the user which captions are still to write."""

    path: Path
    entries: int
    added: list[str] = field(default_factory=list)
    missing_caption: list[str] = field(default_factory=list)
    missing_file: list[str] = field(default_factory=list)
    written: bool = False


def natural_key(name: str) -> tuple:
    """Sort ``11 (2).JPG`` before ``11 (10).JPG``: people number their photos, the file should follow."""
    parts = re.split(r"(\d+)", name.lower())
    return (tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name)


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


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


def normalize_name(name: str) -> str | None:
    """The path ``name`` points to inside the folder, or None when it escapes it (datasets refuses those)."""
    if "://" in name or os.path.isabs(name) or re.match(r"^[A-Za-z]:", name) or name.startswith("\\"):
        return None
    norm = os.path.normpath(name.replace("\\", "/")).replace("\\", "/")
    if norm == ".." or norm.startswith("../") or norm == ".":
        return None
    return norm


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines with their 1-based numbers (blank lines are harmless to datasets' JSON reader).

    A UTF-8 byte-order mark (what some Windows editors write) is skipped: ``datasets`` reads past it too.
    """
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    for line, raw in enumerate(data.split(b"\n"), start=1):
        if raw.strip():
            yield line, raw


def read_metadata(folder: Path | str) -> list[dict]:
    """The entries of ``metadata.jsonl`` (an empty list if there is none); raise on any unreadable line."""
    path = Path(folder) / METADATA_FILE
    if not path.exists():
        return []
    entries = []
    for line, raw in _lines(path):
        entry, problem = _parse(raw, line)
        if entry is not None and not isinstance(entry.get("file_name"), str):
            problem = Problem("no_file_name", 'no "file_name" string', line=line)
        if problem:
            raise MetadataError(
                f"{path}: {problem}. Run `python -m sdcluster.data validate` for all problems"
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


def prepare(folder: Path | str, caption_column: str = "text") -> PrepareReport:
    """Make ``metadata.jsonl`` list every image: keep written captions, add new images with an empty one.

    Entries whose image is gone are kept (a hand-written caption is worth more than a tidy file) and
    reported; :func:`validate` flags them until the image is restored or the line deleted. The file is
    rewritten only when its content changes, because its modification time is part of the cache key
    ``datasets`` uses for the folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of images")
    old_path = folder / METADATA_FILE
    old_text = old_path.read_text(encoding="utf-8") if old_path.exists() else None
    by_name: dict[str, dict] = {}
    for entry in read_metadata(folder):
        entry.setdefault(caption_column, "")
        first = by_name.setdefault(entry["file_name"], entry)
        if not first[caption_column] and entry[caption_column]:
            first[caption_column] = entry[caption_column]  # a duplicate line carried the real caption
    report = PrepareReport(path=old_path, entries=0)
    for name in list_images(folder):
        if name not in by_name:
            by_name[name] = {"file_name": name, caption_column: ""}
            report.added.append(name)
    entries = sorted(by_name.values(), key=lambda e: natural_key(e["file_name"]))
    report.entries = len(entries)
    report.missing_caption = [e["file_name"] for e in entries if not str(e[caption_column]).strip()]
    report.missing_file = [e["file_name"] for e in entries if not (folder / e["file_name"]).is_file()]
    new_text = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries)
    if new_text != old_text:
        write_metadata(folder, entries)
        report.written = True
    return report


def _parse(raw: bytes, line: int) -> tuple[dict | None, Problem | None]:
    try:
        entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, Problem("bad_json", f"not valid JSON ({err}); fix the line or delete it", line=line)
    if not isinstance(entry, dict):
        return None, Problem(
            "not_object", 'expected an object like {"file_name": ..., "text": ...}', line=line
        )
    return entry, None


def _check_caption(entry: dict, line: int, caption_column: str) -> list[Problem]:
    name = entry.get("file_name") if isinstance(entry.get("file_name"), str) else None
    if caption_column not in entry:
        return [Problem("no_caption", f'no "{caption_column}" key; add the caption', name, line)]
    caption = entry[caption_column]
    if not isinstance(caption, str):
        return [Problem("no_caption", f'"{caption_column}" must be a string, got {caption!r}', name, line)]
    if not caption.strip():
        return [
            Problem("empty_caption", f'empty "{caption_column}"; write a caption for this image', name, line)
        ]
    return []


def _check_entry(
    folder: Path, entry: dict, line: int, seen: dict[str, int], caption_column: str, max_pixels: int
) -> list[Problem]:
    """Every problem of one metadata line; ``seen`` maps normalized names to their first line."""
    problems = _check_caption(entry, line, caption_column)
    name = entry.get("file_name")
    if not isinstance(name, str) or not name:
        msg = 'no "file_name"; name the image this caption belongs to'
        return [Problem("no_file_name", msg, line=line), *problems]
    norm = normalize_name(name)
    if norm is None:
        msg = "points outside the dataset folder; use a path relative to the folder, without '..'"
        return [*problems, Problem("outside_folder", msg, name, line)]
    if norm in seen:
        msg = f"listed again (first on line {seen[norm]}); keep one of the lines"
        return [*problems, Problem("duplicate", msg, name, line)]
    seen[norm] = line
    path = folder / norm
    if not path.is_file():
        msg = "no such file in the folder; fix the name (case matters) or delete the line"
        return [*problems, Problem("missing_file", msg, name, line)]
    if not is_image_name(norm):
        msg = f"not an image extension; use one of {', '.join(sorted(IMAGE_EXTENSIONS))}"
        return [*problems, Problem("not_image", msg, name, line)]
    bad = check_image(path, max_pixels, folder)
    return problems + ([Problem(bad[0], bad[1], name, line)] if bad else [])


def validate(folder: Path | str, max_pixels: int = 40_000_000, caption_column: str = "text") -> list[Problem]:
    """Every problem of a dataset folder, in file order, then the images the metadata does not list.

    It decodes every image completely, because a truncated JPEG opens fine and only fails on its pixels.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [Problem("no_folder", f"{folder} is not a folder; check data.path")]
    meta = folder / METADATA_FILE
    if not meta.is_file():
        msg = f"no {METADATA_FILE}; run `python -m sdcluster.data prepare {folder}` and write the captions"
        return [Problem("no_metadata", msg)]
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    for line, raw in _lines(meta):
        entry, problem = _parse(raw, line)
        if problem:
            problems.append(problem)
        if entry is not None:
            problems += _check_entry(folder, entry, line, seen, caption_column, max_pixels)
    if not seen and not problems:
        fix = f"list the images with `python -m sdcluster.data prepare {folder}` and write their captions"
        problems.append(Problem("empty", f"{METADATA_FILE} lists no images; {fix}"))
    for name in list_images(folder):
        if name not in seen:
            msg = f"not listed in {METADATA_FILE}, so training ignores it; run prepare and write its caption"
            problems.append(Problem("unlisted", msg, name))
    return problems
