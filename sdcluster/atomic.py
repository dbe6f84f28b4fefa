"""Crash-safe writes: a reader (another rank, ``sdcluster.logs``, a resumed job) sees the old or new state.

Every run-level file and folder goes through here:

* a file is written under a temporary name in the same folder, fsynced, then renamed over the old one;
* a folder (checkpoint, export, latent-cache entry, built model) is filled under a temporary name, its files
  fsynced, then renamed into place by :func:`publish_dir`, so it is complete or absent;
* a JSON-lines file (metrics, manifest parts) is appended one line at a time by :func:`append_jsonl`, which
  first closes a line torn by a kill, and read by :func:`read_jsonl`, which skips such a line.

A job killed mid-write leaves only a ``.*.tmp`` file or a temporary folder behind, never a truncated result.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("sdcluster")

# How a full disk or quota shows when it does not come as an OSError: torch's zip writer and safetensors'
# Rust writer wrap it in their own errors.
_DISK_FULL_WORDS = (
    "No space left on device",
    "Disk quota exceeded",
    "StorageFull",
    "QuotaExceeded",
    "inline_container",
)


class DiskFull(RuntimeError):
    """A write ran out of space (or quota); the message names the path, the free space and the fix."""


def is_disk_full(err: BaseException) -> bool:
    """True if ``err`` or anything it was raised from is a full disk or an exceeded quota."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(word in str(seen) for word in _DISK_FULL_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@contextlib.contextmanager
def explain_disk_full(path: Path, partial: Path | None = None, resume: str = "") -> Iterator[None]:
    """Around a write: on a full disk, remove the partial folder (so the space a failed save took is given
    back), then raise :class:`DiskFull` naming ``path``, the free space there and the fix."""
    try:
        yield
    except DiskFull:
        raise  # explained already, closer to the file that did not fit
    except Exception as err:
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        if not is_disk_full(err):
            raise
        where = path if path.exists() else path.parent
        while not where.exists():
            where = where.parent
        usage = shutil.disk_usage(where)
        raise DiskFull(
            f"no space left writing {path} ({usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.0f} "
            f"MiB there). Fix: free space or raise your quota, then run the same command again{resume}"
        ) from err


def _umask() -> int:
    """The process's umask, read without changing it (setting it to read it races with other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: the only other way to read it is to set it, then put it back
    os.umask(mask)
    return mask


def write_bytes(path: Path | str, data: bytes, mode: int | None = None) -> Path:
    """Replace ``path`` with ``data``; keep the old file's permissions, else follow the user's umask
    (mkstemp alone would make every file owner-only; a fixed 0644 would ignore a private umask)."""
    path = Path(path)
    if mode is None:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path | str, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path | str, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def fsync_path(path: Path) -> None:
    """Flush one file or folder entry to disk (a rename is only durable once its folder is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """The file's sha256, read in 1 MiB chunks: a size check catches a partial write, only this a bad byte."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def staging_dir(dest: Path) -> Path:
    """A fresh temporary folder beside ``dest`` (same file system, so :func:`publish_dir` is one rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it owner-only; the published folder follows the umask
    return tmp


def publish_dir(tmp: Path, dest: Path, replace: bool = True) -> bool:
    """Make the complete folder ``tmp`` appear as ``dest`` in one rename; True when ``tmp`` was published.

    Every file in ``tmp`` is fsynced first. An existing ``dest`` is moved aside and deleted only after the
    new folder is in place (``replace=True``), so ``dest`` is always the old or the new folder, never a mix.
    With ``replace=False`` an existing ``dest`` wins (another writer published the same content first, and
    its readers may already have it open): ``tmp`` is discarded and False returned. Losing a rename race to
    a concurrent publisher is the same case.
    """
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            fsync_path(path)
    if dest.exists() and not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    aside = dest.with_name(f".old-{dest.name}-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(dest, aside)
    try:
        os.rename(tmp, dest)
    except OSError:  # a concurrent publisher put its folder there between our two renames
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    finally:
        shutil.rmtree(aside, ignore_errors=True)
    fsync_path(dest.parent)
    return True


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync; a line torn by a kill is closed first, so only it is lost."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as fh:  # appends go to the end whatever the read position
        end = fh.seek(0, os.SEEK_END)
        torn = False
        if end:
            fh.seek(end - 1)
            torn = fh.read(1) != b"\n"
        fh.write((b"\n" if torn else b"") + json.dumps(record).encode() + b"\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file in order; a line torn by a kill (or not an object) is skipped."""
    records = []
    if not path.is_file():
        return records
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d: skipping an incomplete line (interrupted write)", path, number)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
