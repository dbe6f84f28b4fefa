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
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdcluster import atomic, identity, paths
from sdcluster.config import Config, ConfigError
from sdcluster.generate import records
from sdcluster.generate.batches import batch_of, shard
from sdcluster.generate.filter import is_done, set_aside_for_redo
from sdcluster.generate.images import save_png_atomic
from sdcluster.generate.manifest_index import contains, file_key
from sdcluster.generate.plan import (
    Item,
    Plan,
    plan_items,
    remake_command,
    template_texts,
)
from sdcluster.generate.render import (
    PromptEmbeddings,
    choose_device_dtype,
    dtype_name,
    load_pipeline,
    render,
    require_model,
)
from sdcluster.generate.scores import Scorer
from sdcluster.models.family import denoiser_of
from sdcluster.progress import ProgressLog
from sdcluster.runtime import ownership, step_events

log = logging.getLogger(__name__)
_RESUME = ": finished images are kept, the rest is made"


@dataclass
class GenerateResult:
    """What one call did: ``generated`` new images, ``skipped`` ones already there, ``total`` in the shard."""

    out_dir: Path
    generated: int
    skipped: int
    total: int
    interrupted: bool


@dataclass(frozen=True)
class _Shared:
    """What every record of one job shares: the template texts and what else can change the bytes."""

    templates: list[str]
    environment: dict[str, Any]


def _environment(dtype: str) -> dict[str, Any]:
    """What changes an image's bytes with the same settings: device, dtype, CPU threads (reductions split
    by thread count round differently) and the versions of the libraries that compute it."""
    import diffusers
    import torch
    import transformers

    device, _ = choose_device_dtype("no")
    name = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"
    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    versions["transformers"] = transformers.__version__
    return {"device": name, "dtype": dtype, "torch_threads": torch.get_num_threads(), "versions": versions}


def _record(cfg: Config, item: Item, size: tuple[int, int], shared: _Shared) -> dict[str, Any]:
    """Everything needed to make this image again alone, and the labels a dataset of the images needs."""
    return {
        "file": item.file,
        "prompt": item.prompt,
        "prompt_index": item.prompt_index,
        "image_index": item.image_index,
        "template_index": item.template_index,
        "template": shared.templates[item.template_index],
        "labels": dict(item.labels),
        "seed": item.seed,
        "generator": "cpu",
        "negative_prompt": item.sampling.negative_prompt,
        "steps": item.sampling.steps,
        "guidance_scale": item.sampling.guidance_scale,
        "scheduler": cfg.generate.scheduler,
        "width": size[0],
        "height": size[1],
        "model": str(paths.generation_model(cfg)),
        **shared.environment,
        **_lora_settings(cfg),
        "remake": remake_command(cfg, item),
    }


def _lora_settings(cfg: Config) -> dict[str, Any]:
    """The LoRA the images are made with; none: no keys, so records of plain models stay as they were."""
    lora = paths.generation_lora(cfg)
    return {} if lora is None else {"lora": str(lora), "lora_scale": cfg.generate.lora_scale}


def _write_settings(cfg: Config, out_dir: Path, plan: Plan) -> None:
    """Write ``settings.json`` once; refuse a folder whose images were made from other prompts.

    The folder name hashes the prompts file's path, not its lines: editing the file would otherwise make
    ``p0003`` mean a different prompt while the old image is kept as "already done".
    """
    settings = identity.generation_settings(cfg)
    prompts = identity.prompts_identity(plan)
    settings.update(model=str(paths.generation_model(cfg)), **_lora_settings(cfg), **prompts)
    path = out_dir / records.SETTINGS
    if path.is_file():
        written = json.loads(path.read_text())
        if not identity.same_prompts(written, plan, prompts):
            raise ConfigError(
                f"generate.prompts_file: {out_dir} was made from other prompts than the ones given now. "
                "Fix: restore the prompts, or move that folder away to start over"
            )
        if written.get("split") == settings["split"]:
            return
        # The split is not the pixels' (nor the folder's): the merge exports the one asked for last.
        settings = written | {"split": settings["split"]}
    atomic.write_json(path, settings)


class _Backfill:
    """Re-adds the records of finished images whose record was lost (crash between rename and append).

    The environment is this job's: the image's own was in the lost record (and is in the PNG's text chunk).
    """

    def __init__(self, cfg: Config, out_dir: Path, part: Path) -> None:
        self.cfg, self.out_dir, self.part = cfg, out_dir, part
        self.recorded = records.recorded_keys(out_dir)
        self.shared: _Shared | None = None  # made at the first lost record: it imports torch


def _backfill_records(backfill: _Backfill, items: list[Item], done: list[bool]) -> None:
    """Re-add the lost records among ``items`` (one batch: the shard is never listed whole)."""
    from PIL import Image

    keys = np.array([file_key(item.file) for item in items], dtype=np.int64)
    found = contains(backfill.recorded, keys).tolist()
    for item, finished, recorded in zip(items, done, found, strict=True):
        if not finished or recorded or not (backfill.out_dir / item.file).is_file():
            continue
        if backfill.shared is None:
            _, dtype = choose_device_dtype(backfill.cfg.generate.mixed_precision)
            backfill.shared = _Shared(template_texts(backfill.cfg), _environment(dtype_name(dtype)))
        with Image.open(backfill.out_dir / item.file) as image:
            record = _record(backfill.cfg, item, image.size, backfill.shared)
            records.append_record(backfill.part, record)


@dataclass
class _Survey:
    """One pass over the shard before rendering: its images, those already done, the batches to render."""

    total: int = 0
    skipped: int = 0
    todo: array = dataclasses.field(default_factory=lambda: array("q"))  # 8 bytes a batch, not a list


def _survey(
    cfg: Config, out_dir: Path, part: Path, batches: Sequence[list[Item]], wanted: set[str] | None
) -> _Survey:
    """Count the shard's done images, note the batches with missing ones, backfill lost records."""
    backfill, survey = _Backfill(cfg, out_dir, part), _Survey()
    for k, batch in enumerate(batches):
        mine = [item for item in batch if wanted is None or item.file in wanted]
        done = [is_done(out_dir, item.file) for item in mine]
        survey.total, survey.skipped = survey.total + len(mine), survey.skipped + sum(done)
        if not all(done):
            survey.todo.append(k)
        _backfill_records(backfill, mine, done)
    return survey


def _run_batches(
    cfg: Config,
    out_dir: Path,
    part: Path,
    batches: Sequence[list[Item]],
    survey: _Survey,
    stop: Callable[[], bool],
    wanted: set[str] | None,
) -> tuple[int, bool]:
    """Render the survey's batches, writing only missing ``wanted`` images (None: all); return (images
    written, interrupted)."""
    pipe = load_pipeline(cfg)
    shared = _Shared(template_texts(cfg), _environment(dtype_name(denoiser_of(pipe).dtype)))
    embeddings = PromptEmbeddings(pipe)
    scorer = Scorer(cfg.generate.scores, cfg.cache_root, pipe.device)  # batched, on the images in memory
    progress = ProgressLog(total=survey.total - survey.skipped, unit="image")
    written = 0
    for number, k in enumerate(survey.todo, 1):
        if stop():
            log.info(
                "stop requested after %d of %d batches; a rerun does the rest", number - 1, len(survey.todo)
            )
            return written, True
        batch = batches[k]
        prompts, seeds = [item.prompt for item in batch], [item.seed for item in batch]
        images = render(pipe, prompts, seeds, cfg.generate, embeddings, batch[0].sampling)
        scored = scorer.score(images, prompts) if scorer.active else [{}] * len(images)
        for item, image, score in zip(batch, images, scored, strict=True):
            target = out_dir / item.file
            # a finished image is never overwritten, a rejected one not made again
            if (wanted is not None and item.file not in wanted) or is_done(out_dir, item.file):
                continue
            record = _record(cfg, item, image.size, shared) | ({"scores": score} if score else {})
            with atomic.explain_disk_full(target, resume=_RESUME, setting="output_root"):
                save_png_atomic(image, target, record)
            records.append_record(part, record)
            written += 1
        progress.report(written, batch=f"{number}/{len(survey.todo)}")
        step_events.boundary("batch", number, step_events.Polled(stop))  # empty unless a test observes
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
    levels. After preemption there is no partial batch, so this costs nothing there. The plan is never
    listed: each batch's items are made from their indexes when the batch comes up.
    """
    plan = plan_items(cfg)
    if not plan.total:
        raise ConfigError("generate.prompts: no prompts. Fix: set generate.prompts or generate.prompts_file")
    require_model(paths.generation_model(cfg), paths.generation_lora(cfg))  # before any folder is made
    out_dir = paths.generation_dir(cfg)
    jobs_folder = paths.job_dir(cfg, job_id) if job_id else None
    # settings, records, manifest: every write is explained
    with atomic.explain_disk_full(out_dir, resume=_RESUME, setting="output_root"):
        # creates the folder once it is ours (the shards of one array share it)
        ownership.enter(out_dir, job_id, cfg.cluster.name, jobs_folder, whole_array=True)
        return _generate_into(cfg, out_dir, plan, shard_index, num_shards, should_stop)


def _generate_into(
    cfg: Config,
    out_dir: Path,
    plan: Plan,
    shard_index: int,
    num_shards: int,
    should_stop: Callable[[], bool],
) -> GenerateResult:
    _write_settings(cfg, out_dir, plan)
    batches: Sequence[list[Item]]
    if cfg.generate.only:  # one image, rendered in the batch it had, written by the first shard
        batch, wanted_item = batch_of(plan, cfg.generate.only, cfg.generate.batch_size)
        batches, wanted = ([batch] if shard_index == 0 else []), {wanted_item.file}
    else:  # None: every item of the batches is wanted (no set of a shard's names)
        batches, wanted = shard(plan, shard_index, num_shards, cfg.generate.batch_size), None
    part = records.part_path(out_dir, shard_index, num_shards)
    if cfg.generate.redo_rejected:  # old copies move to rejected/previous/, the images are made again
        mine = (i.file for b in batches for i in b if wanted is None or i.file in wanted)
        set_aside_for_redo(out_dir, mine)  # type: ignore[arg-type] # it only iterates: no list of names
    survey = _survey(cfg, out_dir, part, batches, wanted)
    log.info(
        "shard %d/%d: %d images, %d already done, %d batches to render -> %s",
        shard_index,
        num_shards,
        survey.total,
        survey.skipped,
        len(survey.todo),
        out_dir,
    )
    generated, interrupted = (
        _run_batches(cfg, out_dir, part, batches, survey, should_stop, wanted) if survey.todo else (0, False)
    )
    # Whoever finishes last merges: records are appended after their image, so once every item has a
    # record every image is on disk. Merging is atomic and idempotent, so two finishers agreeing is fine.
    recorded = records.recorded_keys(out_dir)
    if wanted is not None:
        complete = bool(contains(recorded, np.array([file_key(f) for f in wanted], dtype=np.int64)).all())
    else:  # counted against the plan's arithmetic, not a list of its keys
        complete = plan.count_keys(recorded) == plan.total
    if not interrupted and complete:
        records.merge_image_manifest(out_dir, cfg.generate, cfg.cache_root)
    return GenerateResult(out_dir, generated, survey.skipped, survey.total, interrupted)
