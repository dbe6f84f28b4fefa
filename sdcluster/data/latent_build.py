"""Fill a latent-cache entry: encode the training set once, split over the ranks, one job at a time.

What an entry holds and how it is stored is :mod:`~sdcluster.data.latent_cache`'s business; this module
runs the frozen encoders over it in batches, each rank writing its own contiguous block of rows, and makes
sure the points of a sweep that start together build a shared entry once (:func:`build_lock`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch

from sdcluster import atomic
from sdcluster.config import Config
from sdcluster.data.dataset import (
    crop_to_tensor,
    resize_for_crop,
    target_size,
    tokenize_captions,
)
from sdcluster.data.latent_cache import (
    CACHE_VERSION,
    MISSING,
    CachedExamples,
    Plan,
    commit,
    entry_manifest,
    inspect_entry,
    make_plan,
)
from sdcluster.data.snapshot import readable
from sdcluster.paths import latent_cache_dir
from sdcluster.runtime.distributed import rank0_decides

if TYPE_CHECKING:
    from accelerate import Accelerator

    from sdcluster.models.load import Components

log = logging.getLogger("sdcluster")

ENCODE_BATCH = 8  # captions per text-encoder call while building
ENCODE_PIXELS = 8 * 512 * 512
"""Pixels per VAE call while building: 8 images of 512 px. A fixed 8 images at 1024 px held 24 GiB of the
VAE's float32 activations on an H200, more than an SDXL LoRA step itself (docs/performance.md#gpu-table)."""


def encode_batch(resolution: int) -> int:
    """Images per VAE call at ``resolution``: :data:`ENCODE_PIXELS` worth, 1 to 8."""
    return max(1, min(8, ENCODE_PIXELS // (resolution * resolution)))


def _share(count: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block of ``count`` rows."""
    return count * rank // world, count * (rank + 1) // world


def _write_rows(
    files: dict[Path, tuple[int, ...]], rows: int, batches: Iterable[tuple[torch.Tensor, ...]]
) -> None:
    """Stream encoder outputs into float32 ``.npy`` files of ``rows`` rows each (``files``: path -> row
    shape), without holding them in RAM; each batch holds one tensor per file, in order, so an encoder whose
    one call makes several outputs (SDXL's states and pooled embeddings) runs once per batch."""
    if rows == 0:  # an empty file cannot be memory-mapped
        for path, shape in files.items():
            np.save(path, np.zeros((0, *shape), np.float32))
        return
    outs = [
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, *shape))
        for path, shape in files.items()
    ]
    done = 0
    with torch.no_grad():
        for batch in batches:
            for out, tensor in zip(outs, batch, strict=True):
                array = tensor.float().cpu().numpy()
                if array.shape[1:] != out.shape[1:]:
                    raise RuntimeError(f"encoder output rows {array.shape[1:]} != expected {out.shape[1:]}")
                out[done : done + len(array)] = array
            done += len(batch[0])
    if done != rows:
        raise RuntimeError(f"wrote {done} rows to {list(files)}, expected {rows}")
    for out in outs:
        out.flush()
    del outs
    for path in files:
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())


def share_rows(plan: Plan, rank: int, world: int) -> int:
    """How many posterior rows share ``rank`` of ``world`` encodes (each array split the same way)."""
    return sum(
        hi - lo for lo, hi in (_share(end - first, rank, world) for _, first, end in plan.posterior_arrays())
    )


def encode_share(
    plan: Plan,
    dataset: Any,
    comps: Components,
    res: int,
    device: Any,
    rank: int,
    world: int,
    dest: Path,
    after_batch: Callable[[int], None] | None = None,
) -> None:
    """Encode share ``rank`` of ``world`` of each posterior array's rows and of the caption rows into
    ``dest`` (``<array>.<rank>.npy``). ``after_batch(rows)`` is called after each batch of posterior rows
    with the share's rows done so far: progress lines, and the place a build may stop (by raising)."""
    vae, family = comps.vae, comps.family
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    done = 0

    def posterior_batches(lo: int, hi: int) -> Iterable[torch.Tensor]:
        nonlocal done
        current, resized = -1, None
        step = encode_batch(res)
        for start in range(lo, hi, step):
            pixels = []
            for image, left, top, flip in plan.variants[start : min(start + step, hi)]:
                if image != current:
                    target = plan.target(image, res)  # its bucket's size, or the square
                    current, resized = image, resize_for_crop(dataset[image]["image"], target)
                    if resized.size != plan.sizes[image]:
                        raise RuntimeError(
                            f"image {image}: size {resized.size} != header {plan.sizes[image]}"
                        )
                pixels.append(crop_to_tensor(resized, plan.target(image, res), left, top, flip))
            yield (vae.encode(torch.stack(pixels).to(device, vae.dtype)).latent_dist.parameters,)
            done += len(pixels)
            if after_batch is not None:
                after_batch(done)

    for name, first, end in plan.posterior_arrays():  # one array without buckets, one per bucket with
        lo, hi = (first + k for k in _share(end - first, rank, world))
        width, height = target_size(plan.target(plan.variants[first][0], res))
        shape = (2 * vae.config.latent_channels, height // factor, width // factor)
        _write_rows({dest / f"{name}.{rank}.npy": shape}, hi - lo, posterior_batches(lo, hi))
    clo, chi = _share(len(plan.captions), rank, world)
    ids = tokenize_captions(family.tokenizers(comps), plan.captions[clo:chi]) if chi > clo else {}
    with torch.no_grad():  # the row shape of each array, from one caption
        probe = family.encode(comps, tokenize_captions(family.tokenizers(comps), ["shape"]), device)
    shapes = [tuple(probe[kind].shape[1:]) for kind in plan.text_arrays]
    files = {dest / f"{kind}.{rank}.npy": shape for kind, shape in zip(plan.text_arrays, shapes, strict=True)}

    def encoded() -> Iterable[tuple[torch.Tensor, ...]]:
        for s in range(clo, chi, ENCODE_BATCH):
            batch = {key: rows[s - clo : s - clo + ENCODE_BATCH] for key, rows in ids.items()}
            out = family.encode(comps, batch, device)
            yield tuple(out[kind] for kind in plan.text_arrays)

    _write_rows(files, chi - clo, encoded())


def _build(
    cfg: Config, plan: Plan, dataset: Any, comps: Components, acc: Accelerator, entry: Path, problem: str
) -> None:
    started = time.perf_counter()
    if problem != MISSING:
        log.warning("latent cache entry %s is unusable (%s): rebuilding it", entry, problem)
    tmp = None
    if acc.is_main_process:
        tmp = str(atomic.staging_dir(entry))
    tmp = Path(rank0_decides(acc, tmp))
    rank, world = acc.process_index, acc.num_processes
    mine = share_rows(plan, rank, world)
    log.info("latent cache: encoding rows (%d of %d) into %s", mine, len(plan.variants), entry)
    with atomic.explain_disk_full(entry, tmp if acc.is_main_process else None, ": it builds the cache again"):
        encode_share(plan, dataset, comps, cfg.train.resolution, acc.device, rank, world, tmp)
    acc.wait_for_everyone()
    if acc.is_main_process:
        commit(tmp, entry, entry_manifest(plan, world))
    acc.wait_for_everyone()
    log.info("latent cache: built in %.1f s", time.perf_counter() - started)


LOCK_POLL_S = 5.0


def lock_file(entry: Path) -> Path:
    """``.<key>.lock`` beside ``entry``: the one lock file training jobs (:func:`build_lock`) and
    ``task=cache`` tasks (:func:`entry_lock`) take, so neither builds or publishes while the other does."""
    return entry.parent / f".{entry.name}.lock"


def _try_lock(handle: IO[str], entry: Path, wait: bool = False) -> bool:
    """Take ``entry``'s lock on ``handle`` (open on :func:`lock_file`), waiting for it only with ``wait``:
    False while another process holds it. True also where the file system has no locks (ENOLCK,
    EOPNOTSUPP, ...): then go on without, as two builders of one entry at worst do the work twice and
    :func:`~sdcluster.data.latent_cache.commit` keeps one result."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:  # ENOLCK and friends
        log.warning("latent cache: cannot lock %s (%s); going on without a lock", entry, err)
    return True


@contextlib.contextmanager
def entry_lock(entry: Path) -> Iterator[None]:
    """Hold ``entry``'s lock in this process alone, waiting for it: for a ``task=cache`` process publishing
    the entry (no other ranks to keep informed, unlike :func:`build_lock`). Without a lock, with a warning,
    where the file system has none, as a training job goes on."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file(entry), "a") as handle:
        _try_lock(handle, entry, wait=True)
        yield  # closing the handle releases the lock


@contextlib.contextmanager
def build_lock(entry: Path, acc: Accelerator) -> Iterator[None]:
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
        handle = open(lock_file(entry), "a")  # noqa: SIM115 (held across the yield)
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


def open_or_build(cfg: Config, dataset: Any, comps: Components, acc: Accelerator) -> CachedExamples | None:
    """The cached training examples of ``dataset`` (built first if needed), or None if not cacheable."""
    plan = make_plan(cfg, dataset, comps)
    if plan is None:
        return None
    entry = latent_cache_dir(cfg) / plan.key

    budget = cfg.data.cache_memory_mb * 2**20
    manifest = None  # rank 0's parse of a complete entry's manifest, for opening it below

    def check() -> str | None:
        nonlocal manifest
        problem = None
        if acc.is_main_process:
            problem, manifest = inspect_entry(entry, plan.key, CACHE_VERSION, budget)
        return rank0_decides(acc, problem)

    if check() is not None:  # checked without the lock first: jobs that find it complete never queue up
        with build_lock(entry, acc):
            problem = check()  # again: the job we waited for may have built it
            if problem is not None:  # the images now: a snapshot's are checked against it first
                _build(cfg, plan, readable(cfg, dataset), comps, acc, entry, problem)
    train = cfg.train
    examples = CachedExamples(entry, budget, train.resolution, train.center_crop, train.random_flip, manifest)
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
