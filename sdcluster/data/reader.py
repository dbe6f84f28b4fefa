"""The one reader of ``metadata.jsonl``: :func:`scan` parses and checks every line for ``validate``,
``prepare`` (through :func:`parse_line`) and the job that loads the folder, so the three never disagree on
what a line means or which image it names.

Every way a line or the file it names can be wrong becomes a :class:`Problem` with the line and the fix,
never an exception: a name too long for the file system, a NUL character, a symlink loop, a folder named
like an image, bytes that are not UTF-8.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sdcluster.data.image_checks import check_image, file_problem, plainly_inside

if TYPE_CHECKING:
    from sdcluster.data.file_facts import DecodedMemo

METADATA_FILE = "metadata.jsonl"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})


LONG_NAME = 100


def _shown(name: str) -> str:
    """A file name as a problem line shows it: quoted, and shortened when long (the line number finds it)."""
    if len(name) <= LONG_NAME:
        return repr(name)
    return f"{name[:60] + '...' + name[-20:]!r} ({len(name)} characters)"


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
        if self.file_name is not None:
            where.append(_shown(self.file_name))
        return ": ".join([*where, self.message])


@dataclass(frozen=True)
class Row:
    """A metadata line whose image may be read: its 1-based line, path inside the folder, caption."""

    line: int
    file_name: str
    caption: str


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def normalize_name(name: str) -> str | None:
    """The path ``name`` points to inside the folder, or None when it escapes it (datasets refuses those)."""
    if "://" in name or os.path.isabs(name) or re.match(r"^[A-Za-z]:", name) or name.startswith("\\"):
        return None
    norm = os.path.normpath(name.replace("\\", "/")).replace("\\", "/")
    if norm == ".." or norm.startswith("../") or norm == ".":
        return None
    return norm


def is_utf8(name: str) -> bool:
    """False for a name holding a lone surrogate: a file name that is not UTF-8 on disk (Python keeps its
    bytes as surrogates) or a ``\\udc80`` escape in JSON. Neither can be written to metadata.jsonl or to
    Arrow, so both are refused with a problem line rather than a ``UnicodeEncodeError``."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def split_lines(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines of the file's bytes with their 1-based numbers (blank lines are harmless).

    A UTF-8 byte-order mark (what some Windows editors write) is skipped: ``datasets`` reads past it too.
    """
    for line, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), start=1):
        if raw.strip():
            yield line, raw


def parse_line(raw: bytes, line: int) -> tuple[dict | None, Problem | None]:
    """One line as a JSON object, or the problem that stops every reader (prepare, validate, the job)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        msg = f"not UTF-8 text ({err}); re-save {METADATA_FILE} as UTF-8, or fix or delete the line"
        return None, Problem("bad_json", msg, line=line)
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as err:
        return None, Problem("bad_json", f"not valid JSON ({err}); fix the line or delete it", line=line)
    if not isinstance(entry, dict):
        return None, Problem(
            "not_object", 'expected an object like {"file_name": ..., "text": ...}', line=line
        )
    if not is_utf8(json.dumps(entry, ensure_ascii=False)):
        msg = "a \\ud800-\\udfff escape that is no character (a lone surrogate); fix the line"
        return None, Problem("bad_json", msg, line=line)
    return entry, None


def _check_caption(entry: dict, line: int, caption_column: str) -> list[Problem]:
    name = entry.get("file_name") if isinstance(entry.get("file_name"), str) else None
    if caption_column not in entry:
        keys = ", ".join(map(str, entry))
        fix = "add the caption, or set data.caption_column (--caption-column) to the caption key"
        return [Problem("no_caption", f'no "{caption_column}" key (it has {keys}); {fix}', name, line)]
    caption = entry[caption_column]
    if not isinstance(caption, str):
        return [Problem("no_caption", f'"{caption_column}" must be a string, got {caption!r}', name, line)]
    if not caption.strip():
        return [
            Problem("empty_caption", f'empty "{caption_column}"; write a caption for this image', name, line)
        ]
    return []


def _outside(name: str) -> str:
    """Why :func:`normalize_name` refused ``name``, in the user's terms."""
    if "://" in name:
        return "is a URL, not a file of the folder (download the image into it)"
    if re.match(r"^[A-Za-z]:", name):
        return "starts like a Windows drive (X:), which is not a file of the folder"
    if os.path.isabs(name) or name.startswith("\\"):
        return "is an absolute path"
    return "points outside the dataset folder"


def probe(folder: Path, name: str) -> tuple[str, str] | tuple[None, None]:
    """``(kind, message)`` when the listed ``name`` is not a readable image file of the folder, judged by
    the name and the file system only (no pixels), else ``(None, None)``. Never raises: a name too long for
    the file system, a NUL character, a symlink loop or a permission are each a problem line, not a trace."""
    kind, message, _ = _probe(folder, name)
    return (kind, message) if kind is not None and message is not None else (None, None)


def _probe(folder: Path, name: str) -> tuple[str | None, str | None, os.stat_result | None]:
    """:func:`probe`, with the file's stat when it passed (what says whether it changed since a check)."""
    norm = normalize_name(name)
    if norm is None:
        return (
            "outside_folder",
            f"{_outside(name)}; use a path relative to the dataset folder, without '..'",
            None,
        )
    path = folder / norm
    try:
        info = path.stat()
        mode = info.st_mode
    except FileNotFoundError:
        fix = "fix the name (case matters) or delete the line"
        return "missing_file", f"no such file in the folder; {fix}", None
    except OSError as err:  # ENAMETOOLONG, ELOOP, EACCES, ...: the OS says what, we say the fix
        if err.errno == errno.ENAMETOOLONG:
            fix = "rename the file (at most 255 bytes a folder or file name) and fix the line"
            return "bad_name", f"cannot be opened ({err.strerror}); {fix}", None
        fix = "fix the name, the symlink or the permissions, or delete the line"
        return "unreadable", f"cannot be opened ({err.strerror or err}); {fix}", None
    except ValueError:  # a NUL character: no file can have that name
        return "bad_name", "the name contains a NUL character; fix the name or delete the line", None
    if stat.S_ISDIR(mode):
        return "not_image", "is a folder, not an image file; name an image inside it or delete the line", None
    if not stat.S_ISREG(mode):
        return "not_image", "is not a regular file (a pipe or a device); replace it with the image", None
    if not is_image_name(norm):
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        return "not_image", f"not an image extension; use one of {exts}", None
    return None, None, info


def _content_problem(
    folder: Path, root: Path, norm: str, info: os.stat_result, clean: DecodedMemo | None
) -> tuple[str, str] | None:
    """What :func:`~sdcluster.data.image_checks.file_problem` finds in the file ``norm`` that passed
    :func:`_probe` (with its stat ``info``): what the launch found clean is opened again only when it
    changed, or when it might resolve elsewhere (a symlink on the way)."""
    path = folder / norm
    if clean is None or not clean.known_stat(norm, info) or not plainly_inside(path, folder):
        return file_problem(path, folder, root)
    return None


def listed_file_problem(
    folder: Path, root: Path, name: str, clean: DecodedMemo | None = None
) -> tuple[str, str] | None:
    """``(kind, message)`` of the image a metadata line names as ``name``, judged as :func:`scan` judges it
    for the job (by name, stat and format, no pixel decoded), else None: for a job that reads a few files a
    snapshot lists (:mod:`~sdcluster.data.snapshot`) without scanning the whole metadata again."""
    kind, msg, info = _probe(folder, name)
    if kind is not None and msg is not None:
        return kind, msg
    norm = normalize_name(name)
    assert norm is not None and info is not None  # _probe passed it
    return _content_problem(folder, root, norm, info, clean)


def _check_entry(
    folder: Path,
    root: Path,
    entry: dict,
    line: int,
    seen: dict[str, int],
    caption_column: str,
    clean: DecodedMemo | None = None,
) -> tuple[Row | None, list[Problem], str | None]:
    """The row of one metadata line (None if it cannot be read), every problem of it found without decoding,
    and the image's path in the folder when it passed those checks (what :func:`scan` may decode); ``seen``
    maps normalized names to their first line. ``clean``: files a launch decoded in full and found clean;
    one of them unchanged since (its stat) and lying plainly in the folder (no symlink on the way) had its
    content checked then, so it is not opened again (the format sniff was half of a job's start at 100,000
    images)."""
    problems = _check_caption(entry, line, caption_column)
    name = entry.get("file_name")
    if not isinstance(name, str) or not name:
        msg = 'no "file_name"; name the image this caption belongs to'
        return None, [Problem("no_file_name", msg, line=line), *problems], None
    norm = normalize_name(name)
    if norm is not None and norm in seen:
        msg = f"listed again (first on line {seen[norm]}); keep one of the lines"
        return None, [*problems, Problem("duplicate", msg, name, line)], None
    kind, msg, info = _probe(folder, name)
    if kind is None and info is not None:
        seen[norm] = line
        kind, msg = _content_problem(folder, root, norm, info, clean) or (None, None)
    if kind is not None:
        return None, [*problems, Problem(kind, msg, name, line)], None
    caption = entry.get(caption_column)
    return (Row(line, norm, caption) if isinstance(caption, str) else None), problems, norm


def scan(
    folder: Path | str,
    caption_column: str = "text",
    max_pixels: int | None = None,
    cache_root: Path | str | None = None,
    remember: bool = False,
    clean_under: int | None = None,
) -> tuple[list[Row], list[Problem]]:
    """The one reader of a dataset folder's metadata, for :func:`validate` and the job alike: the rows whose
    image may be read, in file order, and every problem of every line. Images are decoded in full only with
    ``max_pixels`` (validate); the job checks names and file contents without decoding. With ``cache_root``
    (the launch's check), an image that decoded cleanly before and has not changed is not decoded again
    (:class:`~sdcluster.data.file_facts.DecodedMemo`); ``remember``: record the ones decoded cleanly now (a
    launch that submits; a dry run writes nothing). ``clean_under`` (the job, with ``cache_root``): the
    ``data.max_pixels`` its launch decoded the images under; those it found clean and that did not change
    since are not opened again."""
    folder = Path(folder)
    if not folder.is_dir():
        return [], [Problem("no_folder", f"{folder} is not a folder; check data.path")]
    meta = folder / METADATA_FILE
    if not meta.is_file():
        msg = f"no {METADATA_FILE}; run `python -m sdcluster.data prepare {folder}` and write the captions"
        return [], [Problem("no_metadata", msg)]
    try:
        data = meta.read_bytes()
    except OSError as err:
        return [], [Problem("no_metadata", f"{meta} cannot be read ({err.strerror}); check its permissions")]
    root = folder.resolve()  # once: each image's real path must lie inside it
    clean = None
    if cache_root is not None and clean_under is not None and max_pixels is None:
        from sdcluster.data.file_facts import DecodedMemo

        clean = DecodedMemo(cache_root, folder, clean_under)
    checked: list[tuple[Row | None, list[Problem]]] = []  # per line, in file order
    to_decode: list[tuple[int, int, str, str]] = []  # (index in checked, line, name as written, path)
    seen: dict[str, int] = {}
    for line, raw in split_lines(data):
        entry, problem = parse_line(raw, line)
        if problem:
            checked.append((None, [problem]))
            continue
        row, found, path = _check_entry(folder, root, entry, line, seen, caption_column, clean)
        if path is not None and max_pixels is not None:
            to_decode.append((len(checked), line, entry["file_name"], path))
        checked.append((row, found))
    if to_decode:  # every image that passed the checks above, decoded in full (validate)
        paths = [folder / path for *_, path in to_decode]
        decoded = decode_all(paths, max_pixels, folder, cache_root, remember)
        for (i, line, name, _), bad in zip(to_decode, decoded, strict=True):
            if bad is not None:
                checked[i] = (None, [*checked[i][1], Problem(bad[0], bad[1], name, line)])
    rows = [row for row, _ in checked if row is not None]
    return rows, [problem for _, found in checked for problem in found]


PARALLEL_FROM = 2_000  # images; fewer are decoded in this process (starting workers costs about a second)


def decode_all(
    paths: list[Path],
    max_pixels: int,
    folder: Path,
    cache_root: Path | str | None = None,
    remember: bool = False,
) -> list[tuple[str, str] | None]:
    """:func:`check_image` of each path, in order; with ``cache_root``, only of those its
    :class:`~sdcluster.data.file_facts.DecodedMemo` does not know (the others are None), with ``remember``
    recording the ones that decode cleanly."""
    if cache_root is None:
        return _decode(paths, max_pixels, folder)
    from sdcluster.data.file_facts import DecodedMemo

    memo = DecodedMemo(cache_root, folder, max_pixels)
    todo = [k for k, path in enumerate(paths) if not memo.known(path)]
    found: list[tuple[str, str] | None] = [None] * len(paths)
    for k, bad in zip(todo, _decode([paths[k] for k in todo], max_pixels, folder), strict=True):
        found[k] = bad
    if remember:
        memo.remember([paths[k] for k in todo if found[k] is None])
        memo.save()
    return found


def _decode(paths: list[Path], max_pixels: int, folder: Path) -> list[tuple[str, str] | None]:
    """:func:`check_image` of each path, in order, over the CPUs this process may use: decoding every image
    is the whole cost of ``validate`` (about 0.5 ms per small PNG, so a minute per 100,000 images on one
    core). Worker processes are spawned, not forked: a login-side caller may hold threads (torch's)."""
    import concurrent.futures
    import functools
    import multiprocessing

    check = functools.partial(check_image, max_pixels=max_pixels, folder=folder)
    workers = min(len(os.sched_getaffinity(0)), max(1, len(paths) // (PARALLEL_FROM // 2)))
    if len(paths) < PARALLEL_FROM or workers < 2:
        return [check(path) for path in paths]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(check, paths, chunksize=max(64, len(paths) // (workers * 8))))
