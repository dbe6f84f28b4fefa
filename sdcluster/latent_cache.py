"""Encode the frozen VAE and text encoder once per dataset, not at every step, and reuse it across runs.

With ``data.cache=true`` the training images are encoded in one batched pass (split over the ranks of a
multi-process job) into ``cache_dir/latents/<key>/``, where the key hashes everything the stored numbers
depend on: the model (source, revision, variant, and size + mtime of every vae/text_encoder/tokenizer file),
the encoders' dtypes, the resolution, the crop/flip policy, and the dataset contents (each training image's
file bytes and caption, in row order). Every run and sweep point with the same key reuses the entry; a
changed image or caption is a new key.

What is stored, and why:

* The VAE posterior *parameters* (mean and log-variance, ``latent_dist.parameters``), not a sample. Each
  micro-step still draws its own sample from ``step_generator`` with :func:`sdcluster.loss.sample_posterior`,
  as :func:`sdcluster.loss.encode_latents` does, so training from the cache follows the loss curve of
  training from images (up to float rounding: batched encoding rounds differently).
* Flip: both orientations are encoded. A VAE is not equivariant to mirroring (its convolutions are not
  symmetric), so flipping latents would be a different augmentation.
* Crop: every distinct crop offset the random crop can pick is encoded, so the ``aug_seed`` selects exactly
  the crop ``augment`` would have made. A resized image has ``(w-R+1)*(h-R+1)`` of them (1 for square
  images or ``center_crop``); if the dataset averages more than :data:`MAX_MEAN_CROPS`, caching would cost
  more than it saves, and training encodes every step instead (one log line says so).
* Text: the hidden states of each distinct caption, once.

An entry is built in a temporary folder and renamed into place after ``manifest.json`` (size and sha256 of
every file) is written, so it is complete or absent. At every start the files are checked against the
manifest; a missing, partial or corrupt entry is named in a warning and rebuilt, never trained on. Reading
is in :mod:`sdcluster.latent_store` (in RAM within ``data.cache_memory_mb``, else memory-mapped).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdcluster.config import Config
from sdcluster.data.dataset import (
    crop_and_flip,
    crop_to_tensor,
    resize_for_crop,
    resized_size,
    tokenize_captions,
    upright_size,
)
from sdcluster.distributed import rank0_decides
from sdcluster.latent_store import MISSING, CachedExamples, commit, file_digest, verify
from sdcluster.loss import encode_text
from sdcluster.paths import cache_dir, stable_hash

log = logging.getLogger("sdcluster")

CACHE_VERSION = 1  # bump when the variant order changes: old entries then get new keys
MAX_MEAN_CROPS = 32  # distinct random crops per image (on average) beyond which the cache is not used
ENCODE_BATCH = 8  # images per VAE call while building: batched, yet small enough for 512 px on any GPU
Variant = tuple[int, int, int, bool]  # (image row, crop left, crop top, mirrored)


@dataclass
class Plan:
    """What an entry holds: ``variants[row]`` is the crop/flip of one posterior row."""

    key: str
    sizes: list[tuple[int, int]]
    variants: list[Variant]
    captions: list[str]
    caption_rows: list[int]


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


def _hub_snapshot(source: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import snapshot_download

        patterns = ["vae/*", "text_encoder/*", "tokenizer/*"]
        folder = snapshot_download(source, revision=revision, local_files_only=True, allow_patterns=patterns)
        return Path(folder)
    except Exception:  # not in the local hub cache: the id and revision are all we know
        return None


def model_identity(source: str, revision: str | None, variant: str | None) -> dict[str, Any]:
    """Source, revision and (size, mtime) of every file the cached numbers come from."""
    folder = Path(source) if Path(source).is_dir() else _hub_snapshot(source, revision)
    files: dict[str, list[int]] = {}
    for sub in ("vae", "text_encoder", "tokenizer") if folder else ():
        for path in sorted((folder / sub).rglob("*")):
            if path.is_file():
                stat = path.stat()
                files[path.relative_to(folder).as_posix()] = [stat.st_size, stat.st_mtime_ns]
    return {"source": source, "revision": revision, "variant": variant, "files": files}


def make_plan(cfg: Config, dataset: Any, comps: Any) -> Plan | None:
    """The entry this run needs, or None (with one log line) when its crop policy is not worth caching."""
    res, center, flip = cfg.train.resolution, cfg.train.center_crop, cfg.train.random_flip
    folder = Path(cfg.data.path)
    names = list(dataset["file_name"])
    captions = list(dataset[cfg.data.caption_column])
    if not all(isinstance(c, str) for c in captions):
        raise ValueError("some rows have no caption string; run `python -m sdcluster.data validate`")
    sizes = [resized_size(upright_size(folder / name), res) for name in names]
    crops = len(sizes) if center else sum((w - res + 1) * (h - res + 1) for w, h in sizes)
    if crops > MAX_MEAN_CROPS * len(sizes):
        log.info(
            "latent cache off: random crops of these images give %.0f distinct crops per image on average "
            "(more than %d), so the VAE encodes every step. Fix: train.center_crop=true, or square images",
            crops / len(sizes),
            MAX_MEAN_CROPS,
        )
        return None
    identity = {
        "version": CACHE_VERSION,
        "model": model_identity(comps.source, cfg.model.revision, cfg.model.variant),
        "dtypes": [str(comps.vae.dtype), str(comps.text_encoder.dtype)],
        "resolution": res,
        "center_crop": center,
        "random_flip": flip,
        "images": [[file_digest(folder / n), c] for n, c in zip(names, captions, strict=True)],
    }
    unique = list(dict.fromkeys(captions))
    row_of = {caption: row for row, caption in enumerate(unique)}
    variants = plan_variants(sizes, res, center, flip)
    return Plan(stable_hash(identity, 24), sizes, variants, unique, [row_of[c] for c in captions])


def _share(count: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block of ``count`` rows."""
    return count * rank // world, count * (rank + 1) // world


def _write_rows(path: Path, rows: int, shape: tuple[int, ...], batches: Iterable[torch.Tensor]) -> None:
    """Stream encoder outputs into a float32 ``.npy`` of ``rows`` rows without holding them all in RAM."""
    if rows == 0:  # an empty file cannot be memory-mapped
        np.save(path, np.zeros((0, *shape), np.float32))
        return
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, *shape))
    done = 0
    with torch.no_grad():
        for batch in batches:
            array = batch.float().cpu().numpy()
            if array.shape[1:] != shape:
                raise RuntimeError(f"encoder output rows {array.shape[1:]} != expected {shape}")
            out[done : done + len(array)] = array
            done += len(array)
    if done != rows:
        raise RuntimeError(f"wrote {done} rows to {path}, expected {rows}")
    out.flush()
    del out
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _encode_share(
    plan: Plan, dataset: Any, comps: Any, res: int, device: Any, rank: int, world: int, dest: Path
):
    """Encode this rank's block of posterior rows and of caption rows into ``dest``."""
    vae, text_encoder = comps.vae, comps.text_encoder
    lo, hi = _share(len(plan.variants), rank, world)
    side = res // 2 ** (len(vae.config.block_out_channels) - 1)

    def posterior_batches() -> Iterable[torch.Tensor]:
        current, resized = -1, None
        for start in range(lo, hi, ENCODE_BATCH):
            pixels = []
            for image, left, top, flip in plan.variants[start : min(start + ENCODE_BATCH, hi)]:
                if image != current:
                    current, resized = image, resize_for_crop(dataset[image]["image"], res)
                    if resized.size != plan.sizes[image]:
                        raise RuntimeError(
                            f"image {image}: size {resized.size} != header {plan.sizes[image]}"
                        )
                pixels.append(crop_to_tensor(resized, res, left, top, flip))
            yield vae.encode(torch.stack(pixels).to(device, vae.dtype)).latent_dist.parameters

    shape = (2 * vae.config.latent_channels, side, side)
    _write_rows(dest / f"posterior.{rank}.npy", hi - lo, shape, posterior_batches())
    clo, chi = _share(len(plan.captions), rank, world)
    ids = tokenize_captions(comps.tokenizer, plan.captions[clo:chi]) if chi > clo else torch.zeros(0, 1)
    hidden = (
        encode_text(text_encoder, ids[s : s + ENCODE_BATCH].to(device))
        for s in range(0, len(ids), ENCODE_BATCH)
    )
    shape = (comps.tokenizer.model_max_length, text_encoder.config.hidden_size)
    _write_rows(dest / f"text.{rank}.npy", chi - clo, shape, hidden)


def _manifest(plan: Plan, world: int) -> dict[str, Any]:
    """What readers need besides the arrays: which crop/flip each row is, which caption row each image has."""
    return {
        "version": CACHE_VERSION,
        "key": plan.key,
        "world_size": world,
        "sizes": plan.sizes,
        "variants": plan.variants,
        "caption_rows": plan.caption_rows,
    }


def _build(cfg: Config, plan: Plan, dataset: Any, comps: Any, acc: Any, entry: Path, problem: str) -> None:
    started = time.perf_counter()
    if problem != MISSING:
        log.warning("latent cache entry %s is unusable (%s): rebuilding it", entry, problem)
    tmp = None
    if acc.is_main_process:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".build-{entry.name}-", dir=entry.parent)
    tmp = Path(rank0_decides(acc, tmp))
    rank, world = acc.process_index, acc.num_processes
    lo, hi = _share(len(plan.variants), rank, world)
    log.info("latent cache: encoding rows %d-%d of %d into %s", lo, hi, len(plan.variants), entry)
    _encode_share(plan, dataset, comps, cfg.train.resolution, acc.device, rank, world, tmp)
    acc.wait_for_everyone()
    if acc.is_main_process:
        commit(tmp, entry, _manifest(plan, world))
    acc.wait_for_everyone()
    log.info("latent cache: built in %.1f s", time.perf_counter() - started)


LOCK_POLL_S = 5.0


def _try_lock(handle: Any, entry: Path) -> bool:
    """Take the lock without waiting; True also where the file system has no locks (then go on without)."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:  # ENOLCK and friends
        log.warning("latent cache: cannot lock %s (%s); building without a lock", entry, err)
    return True


@contextlib.contextmanager
def build_lock(entry: Path, acc: Any) -> Iterator[None]:
    """Rank 0 of each job holds ``.<key>.lock`` while its job checks and builds ``entry``.

    The points of a sweep start together and share one key: without the lock each would encode the whole
    dataset. With it, the first builds and the others wait, then find the entry complete. ``flock`` works
    on local disks and on NFS (Linux maps it to NFS byte-range locks); where locking is not supported the
    jobs go on without it (they may then encode the same entry twice; :func:`latent_store.commit` keeps
    one). Rank 0 polls rather than blocks and tells the other ranks each time, so a long wait is many
    short collectives, never one that outlasts the process group's time-out (10 min under NCCL).
    """
    handle = None
    if acc.is_main_process:
        entry.parent.mkdir(parents=True, exist_ok=True)
        handle = open(entry.parent / f".{entry.name}.lock", "a")  # noqa: SIM115 (held across the yield)
    try:
        waited = False
        while not rank0_decides(acc, _try_lock(handle, entry) if handle else None):
            if not waited:
                log.info("latent cache: another job is building %s; waiting for it", entry)
                waited = True
            time.sleep(LOCK_POLL_S)
        yield
    finally:
        if handle is not None:
            handle.close()  # releases the lock


def open_or_build(cfg: Config, dataset: Any, comps: Any, acc: Any) -> CachedExamples | None:
    """The cached training examples of ``dataset`` (built first if needed), or None if not cacheable."""
    plan = make_plan(cfg, dataset, comps)
    if plan is None:
        return None
    entry = cache_dir(cfg) / "latents" / plan.key

    def check() -> str | None:
        return rank0_decides(acc, verify(entry, plan.key, CACHE_VERSION) if acc.is_main_process else None)

    if check() is not None:  # checked without the lock first: jobs that find it complete never queue up
        with build_lock(entry, acc):
            problem = check()  # again: the job we waited for may have built it
            if problem is not None:
                _build(cfg, plan, dataset, comps, acc, entry, problem)
    budget = cfg.data.cache_memory_mb * 2**20
    examples = CachedExamples(
        entry, budget, cfg.train.resolution, cfg.train.center_crop, cfg.train.random_flip
    )
    log.info(
        "latent cache: %s (%d crop/flip variants of %d images, %.1f MB, %s; data.cache_memory_mb=%d)",
        entry,
        len(plan.variants),
        len(plan.sizes),
        examples.nbytes / 2**20,
        "in RAM" if examples.in_memory else "memory-mapped from disk",
        cfg.data.cache_memory_mb,
    )
    return examples
