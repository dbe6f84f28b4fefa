"""Sealed folders: a folder whose own manifest lists its files, each with its size and sha256.

Two kinds are written: a checkpoint (``step-N/sdcluster-checkpoint.json``, the *checkpoint manifest*,
:mod:`sdcluster.train.step_folders`) and a latent-cache entry (``<key>/manifest.json``, the *entry
manifest*, :mod:`sdcluster.data.latent_cache`). Each keeps its own manifest format on disk and its own
extra checks (the checkpoint's digest and step, the entry's key and shard list); what they share is here:
the file list is made by :func:`file_entries` when the folder is sealed and checked by :func:`files_problem`
before the folder is trusted. (The generation's ``manifest.jsonl``, the *image manifest*, is a list of
records, not a seal: :mod:`sdcluster.generate.records`.)

A size check catches a partial write; only the sha256 catches a flipped byte of the right size, at the
price of reading every file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sdcluster.atomic import file_sha256


def file_entries(folder: Path, files: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """``{name: {"bytes", "sha256"}}`` of ``files``, each named by its path relative to ``folder``."""
    return {
        str(path.relative_to(folder)): {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        for path in sorted(files)
    }


def files_problem(folder: Path, files: Mapping[str, Any], content: bool = True) -> str | None:
    """Why the files ``files`` lists (as :func:`file_entries` makes them) do not match ``folder``, or None.

    Each listed file must be there at its size and, with ``content``, its sha256; an entry without a
    ``sha256`` is checked by size only (checkpoints written before sizes had checksums). Files the list
    does not name are not looked at: the caller knows which it expects.
    """
    for name, entry in files.items():
        size = entry.get("bytes") if isinstance(entry, Mapping) else None
        if not isinstance(size, int):
            return f"the manifest's entry for {name} has no size (edited or corrupt)"
        path = folder / name
        if not path.is_file():
            return f"missing {name}"
        actual = path.stat().st_size
        if actual != size:
            return f"{name} is {actual} bytes, the manifest says {size} (truncated or corrupt)"
        if content and entry.get("sha256") and file_sha256(path) != entry["sha256"]:
            return f"{name} does not match its sha256 (corrupt)"
    return None
