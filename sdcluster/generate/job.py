"""The generation job: make this shard's missing images, then (last finisher) merge the manifest.

What to make comes from :mod:`~sdcluster.generate.plan`, how one batch is rendered from
:mod:`~sdcluster.generate.render`, and where files go from :mod:`~sdcluster.generate.records`. A rerun skips
finished images and fills only the missing ones; ``should_stop`` ends the job between batches for
preemption. Pixels agree across batch sizes up to the rounding of batched kernels, at most a level here and
there (see :func:`generate_images`); across shard counts they are byte-identical.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdcluster import atomic, paths
from sdcluster.cluster import ownership
from sdcluster.cluster.requeue import hold_for_signal
from sdcluster.config import Config, ConfigError
from sdcluster.generate import records
from sdcluster.generate.images import save_png_atomic
from sdcluster.generate.plan import Item, plan_items, shard
from sdcluster.generate.render import (
    PromptEmbeddings,
    choose_device_dtype,
    dtype_name,
    load_pipeline,
    render,
    require_model,
)
from sdcluster.progress import ProgressLog

log = logging.getLogger(__name__)


@dataclass
class GenerateResult:
    """What one call did: ``generated`` new images, ``skipped`` ones already there, ``total`` in the shard."""

    out_dir: Path
    generated: int
    skipped: int
    total: int
    interrupted: bool


def _record(cfg: Config, item: Item, size: tuple[int, int], dtype: str) -> dict[str, Any]:
    gen = cfg.generate
    return {
        "file": item.file,
        "prompt": item.prompt,
        "prompt_index": item.prompt_index,
        "image_index": item.image_index,
        "seed": item.seed,
        "generator": "cpu",
        "negative_prompt": gen.negative_prompt,
        "steps": gen.steps,
        "guidance_scale": gen.guidance_scale,
        "scheduler": gen.scheduler,
        "width": size[0],
        "height": size[1],
        "model": str(paths.generation_model(cfg)),
        "dtype": dtype,
    }


def _write_settings(cfg: Config, out_dir: Path, prompts: list[str]) -> None:
    """Write ``settings.json`` once; refuse a folder whose images were made from other prompts.

    The folder name hashes the prompts file's path, not its lines: editing the file would otherwise make
    ``p0003`` mean a different prompt while the old image is kept as "already done".
    """
    settings = dataclasses.asdict(cfg.generate)
    for key in ("batch_size", "shards"):  # do not change pixels, so not part of the folder's identity
        settings.pop(key)
    settings.update(model=str(paths.generation_model(cfg)), resolved_prompts=prompts)
    path = out_dir / records.SETTINGS
    if path.is_file():
        old = json.loads(path.read_text()).get("resolved_prompts")
        if old is not None and old != prompts:
            raise ConfigError(
                f"generate.prompts_file: {out_dir} was made from other prompts than the ones given now. "
                "Fix: restore the prompts, or move that folder away to start over"
            )
        return
    atomic.write_json(path, settings)


def _backfill_records(cfg: Config, out_dir: Path, part: Path, items: list[Item], dtype: str) -> None:
    """Re-add the records of finished images whose record was lost (crash between rename and append)."""
    from PIL import Image

    recorded = records.recorded_files(out_dir)
    for item in items:
        if (out_dir / item.file).is_file() and item.file not in recorded:
            with Image.open(out_dir / item.file) as image:
                records.append_record(part, _record(cfg, item, image.size, dtype))


def _run_batches(
    cfg: Config, out_dir: Path, part: Path, batches: list[list[Item]], stop: Callable[[], bool]
) -> tuple[int, bool]:
    """Render the batches, writing only missing images; return (images written, interrupted)."""
    pipe = load_pipeline(cfg)
    dtype = dtype_name(pipe.unet.dtype)
    embeddings = PromptEmbeddings(pipe, cfg.generate.negative_prompt, cfg.generate.guidance_scale)
    missing = sum(not (out_dir / item.file).exists() for batch in batches for item in batch)
    progress = ProgressLog(total=missing, unit="image")
    written = 0
    for number, batch in enumerate(batches, 1):
        if stop():
            log.info("stop requested after %d of %d batches; a rerun does the rest", number - 1, len(batches))
            return written, True
        prompts, seeds = [item.prompt for item in batch], [item.seed for item in batch]
        images = render(pipe, prompts, seeds, cfg.generate, embeddings)
        for item, image in zip(batch, images, strict=True):
            target = out_dir / item.file
            if target.exists():  # a finished image is never overwritten
                continue
            record = _record(cfg, item, image.size, dtype)
            with atomic.explain_disk_full(target, resume=": finished images are kept, the rest is made"):
                save_png_atomic(image, target, record)
            records.append_record(part, record)
            written += 1
        progress.report(written, batch=f"{number}/{len(batches)}")
        hold_for_signal("batch", number, stop)
    return written, False


def generate_images(
    cfg: Config,
    shard_index: int = 0,
    num_shards: int = 1,
    should_stop: Callable[[], bool] = lambda: False,
    job_id: str | None = None,
) -> GenerateResult:
    """Make this shard's missing images; with one shard, also merge the manifest and draw the contact sheet.

    The shard's items are cut into fixed batches of ``batch_size``; a batch with any missing image is
    rendered whole, and only its missing images are written. Keeping the batch composition fixed makes a
    resumed or repaired run byte-identical to an uninterrupted one: kernels may round differently for
    different batch shapes, so a missing image rendered in a batch of its own could differ in a few pixel
    levels. After preemption there is no partial batch, so this costs nothing there.
    """
    items = plan_items(cfg)
    if not items:
        raise ConfigError("generate.prompts: no prompts. Fix: set generate.prompts or generate.prompts_file")
    require_model(paths.generation_model(cfg))  # before any folder is made
    out_dir = paths.generation_dir(cfg)
    jobs_folder = paths.job_dir(cfg, job_id) if job_id else None
    resume = ": finished images are kept, the rest is made"
    with atomic.explain_disk_full(out_dir, resume=resume):  # settings, records, manifest: all explained
        # creates the folder once it is ours (the shards of one array share it)
        ownership.enter(out_dir, job_id, cfg.cluster.name, jobs_folder, whole_array=True)
        return _generate_into(cfg, out_dir, items, shard_index, num_shards, should_stop)


def _generate_into(
    cfg: Config,
    out_dir: Path,
    items: list[Item],
    shard_index: int,
    num_shards: int,
    should_stop: Callable[[], bool],
) -> GenerateResult:
    _write_settings(cfg, out_dir, [item.prompt for item in items if item.image_index == 0])
    batches = shard(items, shard_index, num_shards, cfg.generate.batch_size)
    mine = [item for batch in batches for item in batch]
    part = records.part_path(out_dir, shard_index, num_shards)
    skipped = sum((out_dir / item.file).is_file() for item in mine)
    _, dtype = choose_device_dtype(cfg.generate.mixed_precision)
    _backfill_records(cfg, out_dir, part, mine, dtype_name(dtype))
    todo = [b for b in batches if not all((out_dir / item.file).is_file() for item in b)]
    log.info(
        "shard %d/%d: %d images, %d already done, %d batches to render -> %s",
        shard_index,
        num_shards,
        len(mine),
        skipped,
        len(todo),
        out_dir,
    )
    generated, interrupted = _run_batches(cfg, out_dir, part, todo, should_stop) if todo else (0, False)
    # Whoever finishes last merges: records are appended after their image, so once every item has a
    # record every image is on disk. Merging is atomic and idempotent, so two finishers agreeing is fine.
    if not interrupted and records.recorded_files(out_dir) >= {item.file for item in items}:
        records.merge_manifest(out_dir)
    return GenerateResult(out_dir, generated, skipped, len(mine), interrupted)
