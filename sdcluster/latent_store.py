"""The on-disk format of a latent-cache entry: publish it atomically, verify it, read it.

Reading keeps the entry in RAM when it fits ``data.cache_memory_mb``, else memory-maps it.

An entry (see :mod:`sdcluster.latent_cache`) is a ``manifest.json`` plus, per building rank ``r``,
``posterior.r.npy`` (rows of VAE posterior parameters, float32) and ``text.r.npy`` (rows of text-encoder
hidden states, float32). Rows of the shards follow each other: shard ``r`` holds rows
``[starts[r], starts[r] + len)``.

Plain ``.npy`` files because ``np.load(mmap_mode="r")`` gives random access to one row without reading the
rest, and the page cache (shared by all processes of a node) does the caching when the entry is too big for
a process's budget. Arrays are opened lazily in each process, so DataLoader workers (fork or spawn) map the
files themselves instead of receiving a pickled copy of the data.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdcluster.data.dataset import crop_and_flip

MANIFEST = "manifest.json"
MISSING = "missing"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(entry: Path, key: str, version: int) -> str | None:
    """None when ``entry`` is complete and intact, else what is wrong (:data:`MISSING` if absent).

    Every file is hashed: a size check catches a partial write, only a checksum catches a flipped byte.
    """
    if not entry.exists():
        return MISSING
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        files = manifest["files"]
        expected = {
            f"{kind}.{r}.npy" for kind in ("posterior", "text") for r in range(manifest["world_size"])
        }
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"no readable manifest ({type(err).__name__})"
    if manifest.get("version") != version or manifest.get("key") != key:
        return "manifest of another key or version"
    if set(files) != expected:
        return f"manifest lists {sorted(files)}, expected {sorted(expected)}"
    for name, want in files.items():
        path = entry / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want['bytes']}"
        if file_digest(path) != want["sha256"]:
            return f"{name} does not match its sha256"
    return None


def commit(tmp: Path, entry: Path, manifest: dict[str, Any]) -> None:
    """Rank 0, once every rank wrote its shard into ``tmp``: checksums and manifest last, then one rename
    publishes the entry, so readers see a complete entry or none."""
    files = {f.name: {"bytes": f.stat().st_size, "sha256": file_digest(f)} for f in sorted(tmp.glob("*.npy"))}
    with open(tmp / MANIFEST, "w") as fh:
        json.dump({**manifest, "files": files}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    if verify(entry, manifest["key"], manifest["version"]) is None:
        # Another job published a good entry while we built ours (only without a working build lock, see
        # latent_cache.build_lock): keep theirs, which its readers may already have open.
        shutil.rmtree(tmp, ignore_errors=True)
        return
    bad = entry.with_name(f".bad-{entry.name}-{uuid.uuid4().hex[:8]}")
    # An unusable entry (verify said so) is moved aside so that the rename below can take its place.
    with contextlib.suppress(FileNotFoundError):
        os.rename(entry, bad)
    try:
        os.rename(tmp, entry)
    except OSError:  # another job published the same key first: its entry is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(bad, ignore_errors=True)


class ShardedRows:
    """Rows ``0..N-1`` spread over consecutive ``.npy`` shards, fully loaded or memory-mapped."""

    def __init__(self, files: list[Path], in_memory: bool) -> None:
        self.files = files
        self.in_memory = in_memory
        self._arrays: list[Any] | None = None
        self._starts: list[int] = []

    def _open(self) -> list[Any]:
        if self._arrays is None:
            mode = None if self.in_memory else "r"
            arrays = [np.load(f, mmap_mode=mode) for f in self.files]
            if self.in_memory:  # one tensor, so a batch is a gather from one block of memory
                arrays = [torch.from_numpy(np.concatenate(arrays))]
            starts, total = [], 0
            for array in arrays:
                starts.append(total)
                total += len(array)
            self._arrays, self._starts = arrays, starts
        return self._arrays

    def __getitem__(self, row: int) -> torch.Tensor:
        arrays = self._open()
        shard = bisect.bisect_right(self._starts, row) - 1
        item = arrays[shard][row - self._starts[shard]]
        # A memory-mapped row is a read-only view of the file: copy it into a tensor of our own.
        return item if isinstance(item, torch.Tensor) else torch.from_numpy(np.array(item))

    def __len__(self) -> int:
        return sum(len(a) for a in self._open())

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None, "_starts": []}


class CachedExamples(torch.utils.data.Dataset):
    """Training examples from the cache, addressed by the same ``(index, aug_seed)`` keys as
    :class:`~sdcluster.data.dataset.TrainImages`: the key picks the cached crop and flip that the image
    augmentation would have produced, so the sampler, resume and the loss are unchanged.
    """

    def __init__(
        self, entry: Path, budget_bytes: int, resolution: int, center_crop: bool, flip: bool
    ) -> None:
        manifest = json.loads((entry / MANIFEST).read_text())
        self.entry = entry
        self.nbytes = sum(f["bytes"] for f in manifest["files"].values())
        self.in_memory = self.nbytes <= budget_bytes
        shards = range(manifest["world_size"])
        self.posterior = ShardedRows([entry / f"posterior.{r}.npy" for r in shards], self.in_memory)
        self.hidden = ShardedRows([entry / f"text.{r}.npy" for r in shards], self.in_memory)
        self.sizes = [tuple(size) for size in manifest["sizes"]]
        self.caption_rows = manifest["caption_rows"]
        self.rows = {
            (i, left, top, bool(f)): row for row, (i, left, top, f) in enumerate(manifest["variants"])
        }
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = flip

    def __len__(self) -> int:
        return len(self.sizes)

    def variant(self, index: int, aug_seed: int) -> tuple[int, int, int, bool]:
        """The ``(image, left, top, flip)`` that ``augment`` would apply for this key."""
        size = self.sizes[index]
        left, top, flip = crop_and_flip(size, self.resolution, self.center_crop, self.random_flip, aug_seed)
        return index, left, top, flip

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, aug_seed = key
        row = self.rows[self.variant(int(index), aug_seed)]
        return {"posterior": self.posterior[row], "hidden": self.hidden[self.caption_rows[index]]}
