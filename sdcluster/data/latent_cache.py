"""The latent cache: what an entry holds, its key, and its on-disk format (publish, verify, read).

With ``data.cache=true`` the frozen VAE and text encoder run once per dataset, not at every step
(:mod:`~sdcluster.data.latent_build` fills an entry), into ``<cache_root>/latents/<key>/``, where the key
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

On disk an entry is a ``manifest.json`` (which crop/flip each row is, which caption row each image has, and
the size and sha256 of every file) plus, per building rank ``r``, ``posterior.r.npy`` (rows of posterior
parameters, float32) and ``text.r.npy`` (rows of hidden states, float32; SDXL adds ``pooled.r.npy``);
shard ``r``'s rows follow shard ``r-1``'s. It is built in a temporary folder and published in one rename once
the manifest is written, so it is complete or absent; at every start the files are checked against the
manifest, and a missing, partial or corrupt entry is named in a warning and rebuilt, never trained on.

Plain ``.npy`` files because ``np.load(mmap_mode="r")`` gives random access to one row without reading the
rest, and the page cache (shared by all processes of a node) does the caching when the entry is too big for
a process's budget (``data.cache_memory_mb``; within it the entry is held in RAM). Arrays are opened lazily
in each process, so DataLoader workers (fork or spawn) map the files themselves instead of receiving a
pickled copy of the data.
"""

from __future__ import annotations

import bisect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sdcluster import atomic, sealed
from sdcluster.config import Config
from sdcluster.data.dataset import crop_and_flip, resized_size, time_ids, upright_size
from sdcluster.identity import latent_cache_key
from sdcluster.models.family import TIME_IDS, empty_caption_key
from sdcluster.models.load import encoder_parts, model_files, vae_files

if TYPE_CHECKING:
    from sdcluster.models.load import Components

log = logging.getLogger("sdcluster")

CACHE_VERSION = 2  # bump when what an entry holds changes: old entries then get new keys (2: time ids)
MAX_MEAN_CROPS = 32  # distinct random crops per image (on average) beyond which the cache is not used
Variant = tuple[int, int, int, bool]  # (image row, crop left, crop top, mirrored)


@dataclass
class Plan:
    """What an entry holds: ``variants[row]`` is the crop/flip of one posterior row."""

    key: str
    sizes: list[tuple[int, int]]  # resized, what the crops are taken from
    variants: list[Variant]
    captions: list[str]
    caption_rows: list[int]
    originals: list[tuple[int, int]]  # upright sizes before resizing (SDXL's conditioning)
    text_arrays: tuple[str, ...] = ("text",)  # the family's caption arrays
    empty_row: int | None = None  # the empty caption's row (data.caption_dropout), else not stored


def _crop_offsets(size: tuple[int, int], resolution: int, center_crop: bool) -> list[tuple[int, int]]:
    if center_crop:
        left, top, _ = crop_and_flip(size, resolution, True, False, 0)
        return [(left, top)]
    width, height = size
    return [(left, top) for top in range(height - resolution + 1) for left in range(width - resolution + 1)]


def plan_variants(
    sizes: list[tuple[int, int]], resolution: int, center_crop: bool, random_flip: bool
) -> list[Variant]:
    """Every (image, crop, flip) the augmentation can produce, image by image (each image decoded once)."""
    flips = (False, True) if random_flip else (False,)
    return [
        (image, left, top, flip)
        for image, size in enumerate(sizes)
        for left, top in _crop_offsets(size, resolution, center_crop)
        for flip in flips
    ]


def make_plan(cfg: Config, dataset: Any, comps: Components) -> Plan | None:
    """The entry this run needs, or None (with one log line) when its crop policy is not worth caching."""
    res, center, flip = cfg.train.resolution, cfg.train.center_crop, cfg.train.random_flip
    dropout = cfg.data.caption_dropout > 0
    folder = Path(cfg.data.path)
    names = list(dataset["file_name"])
    captions = list(dataset[cfg.data.caption_column])
    if not all(isinstance(c, str) for c in captions):
        raise ValueError("some rows have no caption string; run `python -m sdcluster.data validate`")
    originals = [upright_size(folder / name) for name in names]
    sizes = [resized_size(size, res) for size in originals]
    crops = len(sizes) if center else sum((w - res + 1) * (h - res + 1) for w, h in sizes)
    if crops > MAX_MEAN_CROPS * len(sizes):
        log.info(
            "latent cache off: random crops of these images give %.0f distinct crops per image on average "
            "(more than %d), so the VAE encodes every step. Fix: train.center_crop=true, or square images",
            crops / len(sizes),
            MAX_MEAN_CROPS,
        )
        return None
    family = comps.family
    encoders = comps.text_encoders.values()
    key = latent_cache_key(
        cfg,
        version=CACHE_VERSION,
        family=family.name,
        source=comps.source,
        files=model_files(comps.source, encoder_parts(family), cfg.model.revision),
        vae_files=vae_files(cfg.model.vae_path) if cfg.model.vae_path else None,
        dtypes=[str(comps.vae.dtype), *(str(encoder.dtype) for encoder in encoders)],
        images=[[atomic.file_sha256(folder / n), c] for n, c in zip(names, captions, strict=True)],
        empty_caption=dropout,
    )
    unique = list(dict.fromkeys(captions))
    row_of = {caption: row for row, caption in enumerate(unique)}
    variants = plan_variants(sizes, res, center, flip)
    rows = [row_of[c] for c in captions]
    empty_row = None
    if dropout:  # a row of its own unless a caption is empty already; after the others, which keep theirs
        empty_row = row_of.get("", len(unique))
        unique += [] if "" in row_of else [""]
    return Plan(key, sizes, variants, unique, rows, originals, family.text_arrays, empty_row)


def entry_manifest(plan: Plan, world: int) -> dict[str, Any]:
    """The entry manifest without its file list (:func:`commit` adds it): what readers need besides the
    arrays, which crop/flip each row is and which caption row each image has (and the empty caption's)."""
    empty = {} if plan.empty_row is None else {"empty_row": plan.empty_row}
    return {
        **empty,
        "version": CACHE_VERSION,
        "key": plan.key,
        "world_size": world,
        "sizes": plan.sizes,
        "originals": plan.originals,
        "variants": plan.variants,
        "caption_rows": plan.caption_rows,
        "text_arrays": list(plan.text_arrays),
    }


ENTRY_MANIFEST = "manifest.json"
"""The entry manifest: what the rows are (:func:`entry_manifest`) and the file list that seals the entry
(:mod:`sdcluster.sealed`); not the checkpoint manifest, nor a generation's image manifest."""
MISSING = "missing"


def verify(entry: Path, key: str, version: int) -> str | None:
    """None when ``entry`` is complete and intact, else what is wrong (:data:`MISSING` if absent).

    Every file is hashed: a size check catches a partial write, only a checksum catches a flipped byte.
    """
    if not entry.exists():
        return MISSING
    try:
        manifest = json.loads((entry / ENTRY_MANIFEST).read_text())
        files = manifest["files"]
        kinds = ("posterior", *manifest["text_arrays"])
        expected = {f"{kind}.{r}.npy" for kind in kinds for r in range(manifest["world_size"])}
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"no readable manifest ({type(err).__name__})"
    if manifest.get("version") != version or manifest.get("key") != key:
        return "manifest of another key or version"
    if set(files) != expected:
        return f"manifest lists {sorted(files)}, expected {sorted(expected)}"
    return sealed.files_problem(entry, files, content=True)


def commit(tmp: Path, entry: Path, manifest: dict[str, Any]) -> None:
    """Rank 0, once every rank wrote its shard into ``tmp``: checksums and manifest last, then one rename
    publishes the entry, so readers see a complete entry or none."""
    files = sealed.file_entries(tmp, tmp.glob("*.npy"))
    with open(tmp / ENTRY_MANIFEST, "w") as fh:
        json.dump({**manifest, "files": files}, fh)
    # A good entry published by another job while we built ours (only without a working build lock, see
    # latent_build.build_lock) is kept: its readers may already have it open. An unusable one is replaced.
    good = verify(entry, manifest["key"], manifest["version"]) is None
    atomic.publish_dir(tmp, entry, replace=not good)


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
        manifest = json.loads((entry / ENTRY_MANIFEST).read_text())
        self.entry = entry
        self.nbytes = sum(f["bytes"] for f in manifest["files"].values())
        self.in_memory = self.nbytes <= budget_bytes
        shards = range(manifest["world_size"])
        self.posterior = ShardedRows([entry / f"posterior.{r}.npy" for r in shards], self.in_memory)
        self.text = {
            kind: ShardedRows([entry / f"{kind}.{r}.npy" for r in shards], self.in_memory)
            for kind in manifest["text_arrays"]
        }
        self.sizes = [tuple(size) for size in manifest["sizes"]]
        self.originals = [tuple(size) for size in manifest["originals"]]
        self.caption_rows = manifest["caption_rows"]
        self.empty_row: int | None = manifest.get("empty_row")
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
        variant = self.variant(int(index), aug_seed)
        row, caption = self.rows[variant], self.caption_rows[index]
        _, left, top, flip = variant
        example = {
            "posterior": self.posterior[row],
            TIME_IDS: time_ids(self.originals[index], self.sizes[index], self.resolution, left, top, flip),
        }
        # each caption array under its own name: the batch keys the family's conditioning reads
        example.update({kind: rows[caption] for kind, rows in self.text.items()})
        if self.empty_row is not None:  # what a dropped caption is trained on (train.loss.caption_drops)
            example.update({empty_caption_key(k): rows[self.empty_row] for k, rows in self.text.items()})
        return example
