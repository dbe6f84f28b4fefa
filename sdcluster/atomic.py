"""Crash-safe writes: a reader (another rank, ``sdcluster.logs``, a resumed job) sees the old or new state.

Every run-level file and folder goes through here:

* a file is written under a temporary name in the same folder, fsynced, then renamed over the old one;
* a folder (checkpoint, export, latent-cache entry, built model) is filled under a temporary name, its files
  fsynced, then renamed into place by :func:`publish_dir`, so it is complete or absent;
* a JSON-lines file (metrics, manifest parts) is appended one line at a time by :func:`append_jsonl`, which
  first closes a line torn by a kill, and read by :func:`iter_jsonl` (streamed) or :func:`read_jsonl` (a
  list), which skip such a line.

A job killed mid-write leaves only a ``.*.tmp`` file or a temporary folder behind, never a truncated result.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
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


class DiskFullError(RuntimeError):
    """A write ran out of space (or quota); the message names the path, the free space and the fix.

    Named ``...Error`` so that it is the exception line the launcher shows for a failed job (it picks the
    last ``<name>Error: message`` line of the job's traceback), not the raw error it was raised from.
    """


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
def explain_disk_full(
    path: Path, partial: Path | None = None, resume: str = "", setting: str = "output_root or cache_root"
) -> Iterator[None]:
    """Around a write: on a full disk, remove the partial folder (so the space a failed save took is given
    back), then raise :class:`DiskFullError` naming ``path``, the free space there and the fix; ``setting``
    is the config key that moves ``path`` to a file system with room."""
    try:
        yield
    except DiskFullError:
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
        raise DiskFullError(
            f"no space left writing {path} ({usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.0f} "
            f"MiB there). Fix: free space or raise your quota there, or point {setting} at a file system "
            f"with room (e.g. scratch), then run the same command again{resume}"
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


OUTPUT_UMASK_ENV = "SDCLUSTER_UMASK"
"""The submitting user's umask (octal), passed to the job: it runs with a private one (see :func:`umask`)."""


@contextlib.contextmanager
def umask(mask: int) -> Iterator[int]:
    """The process umask is ``mask`` inside the block; yields the one it replaces.

    A file gets its mode when it is created, so a writable-by-others window never opens (a chmod afterwards
    leaves one: a descriptor opened for writing in it stays writable after the chmod).
    """
    previous = os.umask(mask)
    try:
        yield previous
    finally:
        os.umask(previous)


@contextlib.contextmanager
def submission_umask(mask: int) -> Iterator[None]:
    """For submitting jobs: the process umask is ``mask``, and ``$SDCLUSTER_UMASK`` holds the user's.

    Everything submitit writes meanwhile gets ``mask`` from birth, and so does the job, which inherits it
    (sbatch passes it on as ``SLURM_UMASK``; a local job is forked): its logs, result pickles and the pickle
    a requeue rewrites. The job's outputs take the user's umask back from the variable, which it inherits
    with the environment (:func:`output_umask`).
    """
    with umask(mask) as user:
        previous = os.environ.get(OUTPUT_UMASK_ENV)
        os.environ[OUTPUT_UMASK_ENV] = f"{user:04o}"
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(OUTPUT_UMASK_ENV, None)
            else:
                os.environ[OUTPUT_UMASK_ENV] = previous


@contextlib.contextmanager
def output_umask() -> Iterator[None]:
    """Inside a job: the submitting user's umask (``$SDCLUSTER_UMASK``) for the block, so the run's outputs
    follow it while the job's own files (``jobs/<id>/``: the pickles submitit loads) stay private.
    Without the variable (a job started by hand, ``--export=NONE``) the process umask stays as it is."""
    value = os.environ.get(OUTPUT_UMASK_ENV, "")
    mask = int(value, 8) & 0o777 if re.fullmatch(r"[0-7]{1,4}", value) else None
    # the yield stays outside any except block: the job's own errors must not carry a parse error along
    with umask(mask) if mask is not None else contextlib.nullcontext():
        yield


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

    Every file in ``tmp`` is fsynced first (its ``.safetensors`` files given the umask's mode). An existing
    ``dest`` is moved aside and deleted only after the new folder is in place (``replace=True``), so
    ``dest`` is always the old or the new folder, never a mix.
    With ``replace=False`` an existing ``dest`` wins (another writer published the same content first, and
    its readers may already have it open): ``tmp`` is discarded and False returned. Losing a rename race to
    a concurrent publisher is the same case.
    """
    mode = 0o666 & ~_umask()
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            if path.suffix == ".safetensors" and not path.is_symlink() and path.stat().st_nlink == 1:
                # safetensors >= 0.8 writes through a temp file that is always 0600 (safetensors#782): a
                # group sharing output_root could read every file but the weights. Written here, by us,
                # so they take the umask's mode like every other file (a hard link is someone else's).
                os.chmod(path, mode)
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


def iter_jsonl_at(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each object of a JSON-lines file with the byte offset of its line, read one line at a time (a
    100,000-image manifest is never held whole). A line torn by a kill is skipped with a warning, one that
    is not an object silently; a missing file has none. Lines are split on ``\\n`` only, as written."""
    if not Path(path).is_file():
        return
    with open(path, "rb") as fh:
        offset = 0
        for number, line in enumerate(fh, 1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8", errors="replace"))
            except json.JSONDecodeError:
                log.warning("%s:%d: skipping an incomplete line (interrupted write)", path, number)
                continue
            if isinstance(record, dict):
                yield start, record


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The objects of a JSON-lines file in order, streamed (see :func:`iter_jsonl_at`)."""
    return (record for _, record in iter_jsonl_at(path))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file in order, as a list (small files: metrics, manifest parts)."""
    return list(iter_jsonl(path))
