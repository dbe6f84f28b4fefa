"""Build a latent-cache entry as an array job (``task=cache``): each task encodes one piece, the last one
to finish publishes the entry.

A training job builds its cache itself, split over its own ranks, and loses it all if it is killed before
the rename that publishes it. At 100,000 images that is hours of one job's GPUs; as an array the same rows
are encoded by ``data.cache_shards`` tasks side by side, and what a killed or preempted task finished is
kept:

* Task ``t`` of ``T`` with ``W`` processes: process ``r`` encodes piece ``t * W + r`` of ``T * W`` (the
  share :func:`~sdcluster.data.latent_build.encode_share` gives that rank of that world), the same
  split the generation array uses.
* A piece is encoded into a temporary folder and published as ``.<key>.pieces-<N>/piece-<k>/`` in one
  rename, with a manifest of its files (size, sha256): a piece folder is complete or absent. A requeued or
  relaunched task finds its piece there, checks it and moves on; a piece killed half-way is encoded again.
* Whichever process finishes while every piece is there (under the entry's lock, the one training jobs
  take) links the pieces' files into a new entry folder, writes the entry manifest and publishes it
  (:func:`~sdcluster.data.latent_cache.commit`), then removes the pieces. Piece ``k``'s files are the entry's
  shard ``k``: the format a training job reads is the one it writes itself, with ``N`` shards.

The entry's key is the training job's (:func:`~sdcluster.data.latent_plan.make_plan`, with the frozen parts
loaded and cast as training loads them, the denoiser left out), so ``task=train`` with the same settings
finds the entry complete and starts without encoding anything.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sdcluster import atomic, sealed
from sdcluster.config import Config
from sdcluster.data.latent_build import encode_share, entry_lock, share_rows
from sdcluster.data.latent_cache import (
    CACHE_VERSION,
    Plan,
    commit,
    entry_manifest,
    make_plan,
    pieces_dir,
    verify,
)
from sdcluster.paths import latent_cache_dir
from sdcluster.progress import ProgressLog
from sdcluster.runtime import step_events

log = logging.getLogger("sdcluster")

PIECE_MANIFEST = "piece.json"
REPORTS = 10  # progress lines per piece (and one at its end)


class Stopped(Exception):
    """The job's stop signal arrived while a piece was being encoded: that piece is left unpublished."""

    def __init__(self, piece: int, done: int, rows: int) -> None:
        super().__init__(f"piece {piece + 1} stopped after {done} of {rows} rows")
        self.done = done


@dataclass
class PieceResult:
    """What one process of a cache task did."""

    entry: Path | None  # None: this crop policy is not cached (make_plan said why)
    rows: int  # posterior rows of this piece (those encoded before the stop, when interrupted)
    encoded: bool  # False when a previous attempt had finished the piece
    published: bool  # this process published the entry
    interrupted: bool = False


def _piece_ok(folder: Path, content: bool = False) -> bool:
    """Whether ``folder`` is a published piece whose files match its manifest: their sizes, and with
    ``content`` their checksums (an earlier attempt's piece, about to be reused; the entry's checksums are
    computed again from the files when it is published)."""
    try:
        files = json.loads((folder / PIECE_MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return sealed.files_problem(folder, files, content=content) is None


def _encode_piece(
    cfg: Config,
    plan: Plan,
    dataset: object,
    comps: object,
    device: object,
    piece: int,
    count: int,
    dest: Path,
    should_stop: Callable[[], bool],
) -> None:
    """Encode piece ``piece`` of ``count`` into ``dest`` (published by the caller), with progress lines."""
    rows = share_rows(plan, piece, count)
    progress = ProgressLog(rows, unit="row")
    every = max(1, rows // REPORTS)
    flag = step_events.Polled(should_stop)
    batches = 0
    last = 0

    def after_batch(done: int) -> None:
        nonlocal batches, last
        batches += 1
        if done - last >= every or done == rows:
            last = done
            progress.report(done, piece=f"{piece + 1}/{count}")
        step_events.boundary("batch", batches, flag)  # tests hold a build here (SDCLUSTER_TEST_PAUSE)
        if flag.raised:
            raise Stopped(piece, done, rows)

    encode_share(plan, dataset, comps, cfg.train.resolution, device, piece, count, dest, after_batch)
    files = sealed.file_entries(dest, dest.glob("*.npy"))
    (dest / PIECE_MANIFEST).write_text(json.dumps({"piece": piece, "count": count, "files": files}))


def _publish_entry(plan: Plan, entry: Path, pieces: Path, count: int) -> bool:
    """Under the entry's lock: publish the entry from ``count`` complete pieces; True when this call did.

    The pieces' files are hard-linked into the new entry (copied where the file system has no links), so
    they stay intact until the entry is published, and only then removed (by ``commit``)."""
    with entry_lock(entry):  # a training job of the same key holds it while it builds
        if verify(entry, plan.key, CACHE_VERSION) is None:
            return False  # another process published it (or a training job built it) first
        folders = [pieces / f"piece-{k}" for k in range(count)]
        if not all(_piece_ok(folder) for folder in folders):
            return False  # not the last piece: the process that finishes the last one publishes
        tmp = atomic.staging_dir(entry)
        try:
            for folder in folders:
                for path in folder.glob("*.npy"):
                    try:
                        os.link(path, tmp / path.name)
                    except FileNotFoundError:
                        raise
                    except OSError:
                        shutil.copy2(path, tmp / path.name)
        except FileNotFoundError:
            # Two tasks finished at once on a file system without locks (entry_lock goes on without one):
            # the other published first, and its commit removed the pieces this one was linking.
            shutil.rmtree(tmp, ignore_errors=True)
            if verify(entry, plan.key, CACHE_VERSION) is not None:
                raise
            return False
        commit(tmp, entry, entry_manifest(plan, count))  # which removes the pieces
    return True


def build_piece(
    cfg: Config, piece: int, count: int, should_stop: Callable[[], bool] = lambda: False
) -> PieceResult:
    """Process ``piece`` of ``count`` of a ``task=cache`` array: encode its rows unless a previous attempt
    did, then publish the entry if every piece is done."""
    import torch

    from sdcluster.data import text_store
    from sdcluster.data.loader import training_rows
    from sdcluster.data.snapshot import readable
    from sdcluster.models.load import half_dtype, load_components, prepare_frozen

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the task's GPU (setup bound it)
    half = half_dtype(cfg.train.mixed_precision)
    comps = load_components(cfg.model, cfg.cache_root, denoiser=False)
    prepare_frozen(cfg.model, comps, device, half)  # as training casts them: the key holds their dtypes
    dataset = training_rows(cfg)
    plan = make_plan(cfg, dataset, comps)
    if plan is None:  # make_plan logged why and what to change
        return PieceResult(None, 0, encoded=False, published=False)
    # what validation encodes, while the encoders are here: the training jobs then load none
    text_store.fill(cfg, comps, device)
    entry = latent_cache_dir(cfg) / plan.key
    rows = share_rows(plan, piece, count)
    if verify(entry, plan.key, CACHE_VERSION, cfg.data.cache_memory_mb * 2**20) is None:  # as training checks
        log.info("latent cache: %s is complete already; nothing to encode", entry)
        return PieceResult(entry, rows, encoded=False, published=False)
    pieces = pieces_dir(entry, count)
    mine = pieces / f"piece-{piece}"
    encoded = not _piece_ok(mine, content=True)
    if encoded:
        log.info(
            "latent cache: piece %d of %d: %d of %d rows (crop/flip variants of %d images) into %s",
            piece + 1,
            count,
            rows,
            len(plan.variants),
            len(plan.sizes),
            mine,
        )
        tmp = atomic.staging_dir(mine)
        encoding = time.perf_counter()
        try:
            images = readable(cfg, dataset)  # a snapshot's checked against it first
            _encode_piece(cfg, plan, images, comps, device, piece, count, tmp, should_stop)
            atomic.publish_dir(tmp, mine)
        except Stopped as stop:
            log.info("latent cache: %s; it is encoded again when the task runs again", stop)
            shutil.rmtree(tmp, ignore_errors=True)
            return PieceResult(entry, stop.done, encoded=True, published=False, interrupted=True)
        except FileNotFoundError:
            # The entry was published meanwhile (a training job's own build, or an array of another
            # data.cache_shards), and its commit removed this array's pieces folder, this piece's included.
            if verify(entry, plan.key, CACHE_VERSION) is not None:
                raise
            log.info(
                "latent cache: %s was published while piece %d was encoded: not needed", entry, piece + 1
            )
            return PieceResult(entry, 0, encoded=False, published=False)
        took = time.perf_counter() - encoding
        log.info(
            "latent cache: piece %d of %d encoded: %d rows in %.1f s (%.1f rows/s; task began %.1f s ago)",
            piece + 1,
            count,
            rows,
            took,
            rows / took if took > 0 else float("nan"),
            time.perf_counter() - started,
        )
    else:
        log.info("latent cache: piece %d of %d was finished by an earlier attempt: kept", piece + 1, count)
    published = _publish_entry(plan, entry, pieces, count)
    if published:
        log.info("latent cache: every piece done; published %s", entry)
    else:
        done = sum((pieces / f"piece-{k}" / PIECE_MANIFEST).exists() for k in range(count))
        log.info("latent cache: %d of %d pieces done; the last to finish publishes the entry", done, count)
    return PieceResult(entry, rows, encoded, published)
