"""Atomic file writes: readers (another rank, ``sdcluster.logs``, a resumed job) see the old or the new file.

Every run-level file goes through here: write under a temporary name in the same folder, fsync, rename.
A job killed mid-write leaves only a ``.*.tmp`` file behind, never a truncated result.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_bytes(path: Path | str, data: bytes, mode: int | None = None) -> Path:
    """Replace ``path`` with ``data``; keep the old file's permissions (mkstemp would make it owner-only)."""
    path = Path(path)
    if mode is None:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
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
