"""The generation job: P prompts x ``num_images`` each, reproducible, shardable and restartable.

Every image is an item (prompt index, image index) whose seed is a hash of (``generate.seed``, prompt index,
image index). The seed, not the batch, decides the noise, so image k can be reproduced alone and the set of
images does not depend on the batch size or on how many shards make it (pixels agree up to the rounding of
batched kernels, at most a level here and there; see :func:`generate_images`). A rerun skips finished images
and fills only the missing ones; ``should_stop`` ends the job between batches for preemption.

The job function is :func:`generate_images` (``jobs.py`` runs it locally or as a SLURM array task, one
task per shard). After a sharded run, merge once all shards are done::

    python -m sdcluster.generate merge FOLDER      # merge the manifest parts + draw the contact sheet
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdcluster import atomic, manifest, paths
from sdcluster.config import Config, ConfigError, GenerateConfig
from sdcluster.manifest import contact_sheet, merge_manifest
from sdcluster.progress import ProgressLog
from sdcluster.sampling import (
    PromptEmbeddings,
    choose_device_dtype,
    dtype_name,
    load_pipeline,
    render,
    require_model,
)

__all__ = [
    "GenerateResult",
    "Item",
    "contact_sheet",
    "generate_images",
    "item_seed",
    "merge_manifest",
    "plan_items",
    "shard",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One image to make."""

    prompt_index: int
    image_index: int
    prompt: str
    seed: int

    @property
    def file(self) -> str:
        return manifest.image_name(self.prompt_index, self.image_index)


@dataclass
class GenerateResult:
    """What one call did: ``generated`` new images, ``skipped`` ones already there, ``total`` in the shard."""

    out_dir: Path
    generated: int
    skipped: int
    total: int
    interrupted: bool


def item_seed(base_seed: int, prompt_index: int, image_index: int) -> int:
    """A 63-bit seed from sha256, identical on every machine and Python (``hash()`` is salted per process)."""
    digest = hashlib.sha256(f"sdcluster-item:{base_seed}:{prompt_index}:{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def read_prompts(gen: GenerateConfig) -> list[str]:
    """``generate.prompts`` followed by the non-empty lines of ``generate.prompts_file``."""
    prompts = list(gen.prompts)
    if gen.prompts_file:
        path = Path(gen.prompts_file)
        if not path.is_file():
            raise ConfigError(f"generate.prompts_file: {path} does not exist. Fix: give a text file path")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts


def plan_items(cfg: Config) -> list[Item]:
    """Every (prompt index, image index) in prompt-major order, each with its own seed."""
    gen = cfg.generate
    return [
        Item(p, i, prompt, item_seed(gen.seed, p, i))
        for p, prompt in enumerate(read_prompts(gen))
        for i in range(gen.num_images)
    ]


def shard(items: list[Item], index: int, count: int, batch_size: int) -> list[list[Item]]:
    """This shard's batches: the global plan is cut into fixed batches first, then batches are dealt out.

    Dealing whole batches (not items) keeps every batch's composition independent of the shard count, so a
    K-shard run writes the same bytes as a 1-shard run (batched kernels round by batch shape).
    """
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside 0..{count - 1}")
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    return batches[index::count]


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
    path = out_dir / manifest.SETTINGS
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

    recorded = manifest.recorded_files(out_dir)
    for item in items:
        if (out_dir / item.file).is_file() and item.file not in recorded:
            with Image.open(out_dir / item.file) as image:
                manifest.append_record(part, _record(cfg, item, image.size, dtype))


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
            manifest.save_png_atomic(image, target, record)
            manifest.append_record(part, record)
            written += 1
        progress.report(written, batch=f"{number}/{len(batches)}")
    return written, False


def generate_images(
    cfg: Config,
    shard_index: int = 0,
    num_shards: int = 1,
    should_stop: Callable[[], bool] = lambda: False,
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
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_settings(cfg, out_dir, [item.prompt for item in items if item.image_index == 0])
    batches = shard(items, shard_index, num_shards, cfg.generate.batch_size)
    mine = [item for batch in batches for item in batch]
    part = manifest.part_path(out_dir, shard_index, num_shards)
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
    if not interrupted and manifest.recorded_files(out_dir) >= {item.file for item in items}:
        merge_manifest(out_dir)
    return GenerateResult(out_dir, generated, skipped, len(mine), interrupted)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdcluster.generate", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="merge the shards' manifest parts and draw the contact sheet")
    merge.add_argument("folder", type=Path, help="a generation folder (holds manifest.parts/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        path = merge_manifest(args.folder)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    records = len(manifest.read_manifest(args.folder))
    on_disk = len(manifest.image_files(args.folder))
    print(f"{records} records in {path} ({on_disk} images on disk)")
    print(f"contact sheet: {args.folder / manifest.CONTACT_SHEET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
