"""The latent cache: what an entry holds, its key, and its on-disk format (publish, verify, read).

With ``data.cache=true`` the frozen VAE and text encoder run once per dataset, not at every step
(:mod:`~sdcluster.data.latent_plan` plans an entry's rows and key, :mod:`~sdcluster.data.latent_build`
fills it), into ``<cache_root>/latents/<key>/``, where the key
(:func:`sdcluster.identity.latent_cache_key`) hashes everything the stored numbers depend on: the model
(source, revision, variant, and size + mtime of every vae/text_encoder/tokenizer file), the encoders'
dtypes, the resolution, the crop/flip policy, and the dataset contents (each training image's file bytes
and caption, in row order). Every run and sweep point with the same key reuses the entry; a changed image or
caption is a new key.

What is stored, and why:

* The VAE posterior *parameters* (mean and log-variance, ``latent_dist.parameters``), not a sample. Each
  micro-step still draws its own sample from ``step_generator`` with
  :func:`sdcluster.train.loss.sample_posterior`, as :func:`sdcluster.train.loss.encode_latents` does, so
  training from the cache follows the loss curve of training from images (up to float rounding: batched
  encoding rounds differently).
* Flip: both orientations are encoded. A VAE is not equivariant to mirroring (its convolutions are not
  symmetric), so flipping latents would be a different augmentation.
* Crop: every distinct crop offset the random crop can pick is encoded, so the ``aug_seed`` selects exactly
  the crop ``augment`` would have made. A resized image has ``(w-R+1)*(h-R+1)`` of them (1 for square
  images or ``center_crop``); if the dataset averages more than :data:`MAX_MEAN_CROPS`, caching would cost
  more than it saves, and training encodes every step instead (one log line says so).
* Text: the hidden states of each distinct caption, once (SDXL: both encoders' penultimate hidden states,
  concatenated as the UNet takes them, and the pooled embedding, in ``pooled.r.npy``). With
  ``data.caption_dropout`` the empty caption is one more row (``empty_row`` in the manifest; the key says
  so, and an entry without dropout keeps the key and the rows it always had), and every example carries its
  encodings too, for the loss to put in a dropped caption's place.
* SDXL's size and crop conditioning: each image's original (upright) size is in the manifest, and each row's
  crop offsets are its variant, so an example's ``time_ids`` are exactly what the image path computes.
* Aspect-ratio buckets (``data.buckets``): each image is stored at its bucket's size, so rows of different
  buckets have different shapes and live in one posterior array per bucket (``posterior.WxH.r.npy``, the
  manifest's ``posterior_arrays`` and each image's ``targets``); the bucket settings are in the key. Cropped
  to cover the bucket, an image has few distinct random crops, so random crops stay cacheable.

An entry held in RAM (``data.cache_memory_mb``) is checksummed at every start, as it is read; a larger one,
memory-mapped, has its file sizes checked at start (its checksums were computed from the files when it
was published), so a start reads the entry's manifest, not the entry.

On disk an entry is a ``manifest.json`` (which crop/flip each row is, which caption row each image has, and
the size and sha256 of every file) plus, per building rank ``r``, ``posterior.r.npy`` (rows of posterior
parameters, float32) and ``text.r.npy`` (rows of hidden states, float32; SDXL adds ``pooled.r.npy``);
shard ``r``'s rows follow shard ``r-1``'s. It is built in a temporary folder and published in one rename once
the manifest is written, so it is complete or absent; at every start the files are checked against the
manifest (as said above), and a missing, partial or corrupt entry is named in a warning and rebuilt, never
trained on. ``task=cache`` builds the same entry as an array job (:mod:`~sdcluster.data.latent_array`),
its ``N`` pieces being the shards.

Plain ``.npy`` files because ``np.load(mmap_mode="r")`` gives random access to one row without reading the
rest, and the page cache (shared by all processes of a node) does the caching when the entry is too big for
a process's budget (``data.cache_memory_mb``; within it the entry is held in RAM). Arrays are opened lazily
in each process, so DataLoader workers (fork or spawn) map the files themselves instead of receiving a
pickled copy of the data.
"""

from __future__ import annotations

import bisect
import glob
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdcluster import atomic, sealed
from sdcluster.data.dataset import Target, crop_and_flip, time_ids
from sdcluster.data.latent_plan import (
    CACHE_VERSION,
    MAX_MEAN_CROPS,
    Plan,
    Variant,
    entry_manifest,
    make_plan,
    plan_variants,
)
from sdcluster.models.family import TIME_IDS, empty_caption_key

__all__ = [  # the plan's names too: what an entry holds is planned in latent_plan, read here
    "CACHE_VERSION",
    "ENTRY_MANIFEST",
    "MAX_MEAN_CROPS",
    "MISSING",
    "CachedExamples",
    "Plan",
    "ShardedRows",
    "Variant",
    "commit",
    "entry_manifest",
    "inspect_entry",
    "make_plan",
    "plan_variants",
    "verify",
]


ENTRY_MANIFEST = "manifest.json"
"""The entry manifest: what the rows are (:func:`entry_manifest`) and the file list that seals the entry
(:mod:`sdcluster.sealed`); not the checkpoint manifest, nor a generation's image manifest."""
MISSING = "missing"


def verify(entry: Path, key: str, version: int, checksum_up_to: int | None = None) -> str | None:
    """None when ``entry`` is complete and intact, else what is wrong (:data:`MISSING` if absent).

    Every file is hashed (a size check catches a partial write, only a checksum catches a flipped byte)
    when the entry holds at most ``checksum_up_to`` bytes (None: any size). A training job passes its RAM
    budget: an entry it loads whole is read whole anyway, while hashing a memory-mapped one (at 100,000
    images, gigabytes) at every start would read the whole dataset before step 1; that one's sizes are
    checked, and its checksums were computed from the files when it was published.
    """
    return inspect_entry(entry, key, version, checksum_up_to)[0]


def inspect_entry(
    entry: Path, key: str, version: int, checksum_up_to: int | None = None
) -> tuple[str | None, dict[str, Any] | None]:
    """:func:`verify`'s answer, and the entry's manifest when it is complete: a start that checks the entry
    and then opens it parses the manifest once (6.7 MB of JSON at 100,000 images: 0.4 s a parse)."""
    if not entry.exists():
        return MISSING, None
    try:
        manifest = json.loads((entry / ENTRY_MANIFEST).read_text())
        files = manifest["files"]
        posteriors = [array[0] for array in manifest.get("posterior_arrays", [["posterior"]])]
        kinds = (*posteriors, *manifest["text_arrays"])
        expected = {f"{kind}.{r}.npy" for kind in kinds for r in range(manifest["world_size"])}
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"no readable manifest ({type(err).__name__})", None
    if manifest.get("version") != version or manifest.get("key") != key:
        return "manifest of another key or version", None
    if set(files) != expected:
        return f"manifest lists {sorted(files)}, expected {sorted(expected)}", None
    size = sum(f.get("bytes", 0) for f in files.values())
    problem = sealed.files_problem(entry, files, content=checksum_up_to is None or size <= checksum_up_to)
    return problem, manifest if problem is None else None


def pieces_dir(entry: Path, count: int) -> Path:
    """Where the ``count`` pieces of a ``task=cache`` array build of ``entry`` wait for the last one
    (:mod:`sdcluster.data.latent_array`; beside the entry: one file system)."""
    return entry.parent / f".{entry.name}.pieces-{count}"


def commit(tmp: Path, entry: Path, manifest: dict[str, Any]) -> None:
    """Rank 0, once every rank wrote its shard into ``tmp``: checksums and manifest last, then one rename
    publishes the entry, so readers see a complete entry or none. Then every pieces folder of the entry
    goes, whatever its count: an array stopped half-way, or launched again with another
    ``data.cache_shards``, left a partial copy of the entry there (at 512 px and 100,000 images, gigabytes)
    that nothing reads once the entry exists."""
    files = sealed.file_entries(tmp, tmp.glob("*.npy"))
    with open(tmp / ENTRY_MANIFEST, "w") as fh:
        json.dump({**manifest, "files": files}, fh)
    # A good entry published by another job while we built ours (only without a working build lock, see
    # latent_build.build_lock) is kept: its readers may already have it open. An unusable one is replaced.
    good = verify(entry, manifest["key"], manifest["version"]) is None
    atomic.publish_dir(tmp, entry, replace=not good)
    for pieces in entry.parent.glob(glob.escape(f".{entry.name}.pieces-") + "*"):
        shutil.rmtree(pieces, ignore_errors=True)


class ShardedRows:
    """Rows ``0..N-1`` spread over consecutive ``.npy`` shards, fully loaded or memory-mapped."""

    def __init__(self, files: list[Path], in_memory: bool) -> None:
        self.files = files
        self.in_memory = in_memory
        self._arrays: list[Any] | None = None
        self._starts: list[int] = []

    def _open(self) -> list[Any]:
        if self._arrays is None:
            arrays = [np.load(f, mmap_mode="r") for f in self.files]
            if self.in_memory:  # one tensor, so a batch is a gather from one block of memory
                whole = np.empty((sum(len(a) for a in arrays), *arrays[0].shape[1:]), arrays[0].dtype)
                start = 0
                for path, array in zip(self.files, arrays, strict=True):
                    # shard by shard into the block: a concatenation held every shard and the block at once
                    whole[start : start + len(array)] = np.load(path)
                    start += len(array)
                arrays = [torch.from_numpy(whole)]
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


def _int_rows(rows: list[list[int]], width: int) -> np.ndarray:
    """A manifest's list of equal-length int lists as one ``(N, width)`` int32 array (also when empty)."""
    return np.asarray(rows, dtype=np.int32).reshape(-1, width)


class CachedExamples(torch.utils.data.Dataset):
    """Training examples from the cache, addressed by the same ``(index, aug_seed)`` keys as
    :class:`~sdcluster.data.dataset.TrainImages`: the key picks the cached crop and flip that the image
    augmentation would have produced, so the sampler, resume and the loss are unchanged.
    """

    def __init__(
        self,
        entry: Path,
        budget_bytes: int,
        resolution: int,
        center_crop: bool,
        flip: bool,
        manifest: dict[str, Any] | None = None,
    ) -> None:
        """``manifest``: the entry's, parsed by :func:`inspect_entry` just before (else read here)."""
        if manifest is None:
            manifest = json.loads((entry / ENTRY_MANIFEST).read_text())
        self.entry = entry
        self.nbytes = sum(f["bytes"] for f in manifest["files"].values())
        self.in_memory = self.nbytes <= budget_bytes
        shards = range(manifest["world_size"])
        arrays = manifest.get("posterior_arrays", [["posterior", 0, len(manifest["variants"])]])
        self.posterior = {
            name: ShardedRows([entry / f"{name}.{r}.npy" for r in shards], self.in_memory)
            for name, _, _ in arrays
        }
        self.text = {
            kind: ShardedRows([entry / f"{kind}.{r}.npy" for r in shards], self.in_memory)
            for kind in manifest["text_arrays"]
        }
        # Each image's sizes, caption row and bucket as int32 arrays, each row's (image, left, top, flip) as
        # one, and each image's rows through a stable sort: a few bytes where Python's lists of tuples took
        # about 60 an image and 400 a row (at 100,000 images, 0.1 GiB held for the whole job and pickled to
        # every loader worker), and the parsed manifest can be let go of whole.
        self._sizes = _int_rows(manifest["sizes"], 2)
        self._originals = _int_rows(manifest["originals"], 2)
        self._caption_rows = np.asarray(manifest["caption_rows"], dtype=np.int32)
        self.empty_row: int | None = manifest.get("empty_row")
        self._targets = _int_rows(manifest["targets"], 2) if "targets" in manifest else None
        self._variants = _int_rows(manifest["variants"], 4)
        images = self._variants[:, 0]
        self._by_image = np.argsort(images, kind="stable").astype(np.int32)
        self._image_start = np.searchsorted(images[self._by_image], np.arange(len(self._sizes) + 1))
        self._arrays = [name for name, _, _ in arrays]
        self._array_starts = [start for _, start, _ in arrays]
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = flip

    def __len__(self) -> int:
        return len(self._sizes)

    @property
    def originals(self) -> list[tuple[int, int]]:
        """Each image's upright size before resizing (what its bucket was chosen by)."""
        return [(w, h) for w, h in self._originals.tolist()]

    def size(self, index: int) -> tuple[int, int]:
        """Image ``index``'s resized size, what its crops are taken from."""
        width, height = self._sizes[index].tolist()
        return width, height

    def target(self, index: int) -> Target:
        """What image ``index`` is cropped to: its bucket's size, or the square."""
        if self._targets is None:
            return self.resolution
        width, height = self._targets[index].tolist()
        return width, height

    def variant(self, index: int, aug_seed: int) -> tuple[int, int, int, bool]:
        """The ``(image, left, top, flip)`` that ``augment`` would apply for this key."""
        size, target = self.size(index), self.target(index)
        left, top, flip = crop_and_flip(size, target, self.center_crop, self.random_flip, aug_seed)
        return index, left, top, flip

    def row_of(self, variant: tuple[int, int, int, bool]) -> tuple[str, int]:
        """(posterior array, row in it) of a cached ``(image, left, top, flip)``; KeyError if not cached."""
        index, left, top, flip = variant
        for row in self._by_image[self._image_start[index] : self._image_start[index + 1]]:
            _, row_left, row_top, row_flip = self._variants[row]
            if row_left == left and row_top == top and bool(row_flip) == flip:
                k = bisect.bisect_right(self._array_starts, int(row)) - 1
                return self._arrays[k], int(row) - self._array_starts[k]
        raise KeyError(variant)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, aug_seed = key
        variant = self.variant(int(index), aug_seed)
        (array, row), caption = self.row_of(variant), int(self._caption_rows[index])
        _, left, top, flip = variant
        target, (width, height) = self.target(index), self._originals[index].tolist()
        example = {
            "posterior": self.posterior[array][row],
            TIME_IDS: time_ids((width, height), self.size(index), target, left, top, flip),
        }
        # each caption array under its own name: the batch keys the family's conditioning reads
        example.update({kind: rows[caption] for kind, rows in self.text.items()})
        if self.empty_row is not None:  # what a dropped caption is trained on (train.loss.caption_drops)
            example.update({empty_caption_key(k): rows[self.empty_row] for k, rows in self.text.items()})
        return example
