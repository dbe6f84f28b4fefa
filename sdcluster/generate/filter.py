"""Set images aside by score (``generate.filter``): rejects move to ``rejected/``, nothing is ever deleted.

Decided at merge, once every image has its scores: near-duplicates can only be judged with all the hashes in
hand, and a merge is already the one place that sees the whole folder. The rules, in order:

1. ``min_clip``: an image less similar to its prompt than this is rejected (``reason: low_clip``);
2. ``drop_near_duplicates``: of the images still kept, each one within ``scores.duplicate_distance`` bits of
   an earlier kept image is rejected (``reason: near_duplicate``, ``of``: the keeper). The keeper is the
   lowest (prompt, image) index, so every merge, by any shard or by hand, makes the same choice.

A rejection is final until asked otherwise: a later merge with a looser filter does not bring an image back,
and the job counts ``rejected/<file>`` as done, so a rerun does not make it again. ``generate.redo_rejected``
moves the old copies to ``rejected/previous/<time>/`` and makes those images again, to be judged afresh.

Crash safety: the reason is appended to ``rejected/reasons.jsonl`` before the image is renamed, so an image in
``rejected/`` always has its reason; a crash in between leaves the image in place, and the next merge, making
the same decision, moves it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sdcluster import atomic
from sdcluster.config.generate import FilterConfig, GenerateConfig, ScoresConfig
from sdcluster.generate.duplicates import KeeperIndex
from sdcluster.generate.manifest_index import file_key, image_name_of

log = logging.getLogger(__name__)

REJECTED = "rejected"
REASONS = "reasons.jsonl"
PREVIOUS = "previous"


def rejected_path(out_dir: Path, file: str) -> Path:
    return Path(out_dir) / REJECTED / file


def image_path(out_dir: Path, record: dict[str, Any]) -> Path:
    """Where a manifest record's image lies: in the folder, or in ``rejected/`` when it was set aside."""
    return rejected_path(out_dir, record["file"]) if "rejected" in record else Path(out_dir) / record["file"]


def locate(out_dir: Path, file: str) -> Path:
    """An image's path whether it is in the folder or set aside (the folder's copy wins)."""
    here = Path(out_dir) / file
    return here if here.is_file() else rejected_path(out_dir, file)


def folder_settings(out_dir: Path) -> GenerateConfig | None:
    """The scores and filter a folder was made with (its ``settings.json``), for a merge by hand."""
    path = Path(out_dir) / "settings.json"
    if not path.is_file():
        return None
    settings = json.loads(path.read_text())
    if "scores" not in settings or "filter" not in settings:  # made before scores existed
        return None
    return GenerateConfig(
        scores=ScoresConfig(**settings["scores"]), filter=FilterConfig(**settings["filter"])
    )


def rejected_files(out_dir: Path) -> set[str]:
    """Names of the images set aside (old copies under ``previous/`` are history, not part of the set)."""
    folder = Path(out_dir) / REJECTED
    if not folder.is_dir():
        return set()
    return {p.name for p in folder.glob("*.png") if p.is_file()}


def is_done(out_dir: Path, file: str, redo_rejected: bool = False) -> bool:
    """The job's "already made" test: the image is in the folder, or was rejected (unless redoing those)."""
    if (Path(out_dir) / file).is_file():
        return True
    return not redo_rejected and rejected_path(out_dir, file).is_file()


def set_aside_for_redo(out_dir: Path, files: list[str]) -> int:
    """Move the rejected copies of ``files`` to ``rejected/previous/<UTC time>/`` so they can be made again.

    Moved, not deleted: the old copy and its reason stay for comparison. Each shard moves only its own files.
    """
    moving = [f for f in files if rejected_path(out_dir, f).is_file() and not (Path(out_dir) / f).exists()]
    if moving:
        dest = _to_previous(out_dir, moving)
        log.info("generate.redo_rejected: %d rejected images moved to %s, made again", len(moving), dest)
    return len(moving)


def _to_previous(out_dir: Path, files: list[str]) -> Path:
    dest = Path(out_dir) / REJECTED / PREVIOUS / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest.mkdir(parents=True, exist_ok=True)
    for file in files:
        if (dest / file).exists():  # set aside twice within a second: never overwrite the first copy
            dest = dest.with_name(f"{dest.name}-{os.getpid()}-{time.monotonic_ns()}")
            dest.mkdir(parents=True)
        with contextlib.suppress(FileNotFoundError):  # another shard of a rerun moved it first
            os.replace(rejected_path(out_dir, file), dest / file)
    return dest


def _reasons(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The last recorded reason of each rejected file."""
    path = Path(out_dir) / REJECTED / REASONS
    return {r["file"]: r["rejected"] for r in atomic.read_jsonl(path) if "file" in r and "rejected" in r}


class _Decider:
    """The rules of ``gen.filter`` applied to records one at a time, in (prompt, image) order.

    Both rules decide from what came before, so a stream serves: a near-duplicate is judged against the
    earlier keepers only. Keepers are remembered by hash and file key (a dozen bytes or so), not by record.
    """

    def __init__(self, gen: GenerateConfig) -> None:
        self.rules = gen.filter
        self.keepers = KeeperIndex(gen.scores.duplicate_distance) if self.rules.drop_near_duplicates else None
        self.keeper_keys = array("q")

    def reason(self, record: dict[str, Any]) -> dict[str, Any] | None:
        """Why this record is rejected now, or None. Records already rejected are never keepers; records
        without the score a rule needs are kept (a merge by hand cannot compute CLIP scores)."""
        if "rejected" in record:
            return None
        scores = record.get("scores", {})
        clip, value = scores.get("clip"), scores.get("phash")
        if self.rules.min_clip is not None and clip is not None and clip < self.rules.min_clip:
            return {"reason": "low_clip", "clip": clip, "min_clip": self.rules.min_clip}
        key = file_key(record["file"])
        if self.keepers is None or value is None or key is None:
            return None
        code = int(value, 16)
        near = self.keepers.nearest(code)
        if near is not None:
            return {
                "reason": "near_duplicate",
                "of": image_name_of(self.keeper_keys[near[0]]),
                "distance": near[1],
            }
        self.keepers.add(code)
        self.keeper_keys.append(key)
        return None


def decide(records: list[dict[str, Any]], gen: GenerateConfig) -> dict[str, dict[str, Any]]:
    """``file -> reason`` for every record in (prompt, image) order that the filter rejects now."""
    decider = _Decider(gen)
    return {r["file"]: reason for r in records if (reason := decider.reason(r)) is not None}


def apply(
    out_dir: Path, records: Iterable[dict[str, Any]], gen: GenerateConfig | None
) -> Iterator[dict[str, Any]]:
    """Mark records rejected earlier, reject (record, then move) what ``gen.filter`` rejects now.

    Records come in (prompt, image) order, each image in the folder or in ``rejected/``, and go out the
    same way, one at a time. Without ``gen`` (a merge by hand of a folder without settings) earlier
    rejections are still marked.
    """
    out_dir = Path(out_dir)
    previous, reasons_log = rejected_files(out_dir), _reasons(out_dir)  # both as large as the rejects only
    decider = _Decider(gen) if gen is not None else None
    count = 0
    for record in records:
        if record["file"] in previous and not (out_dir / record["file"]).is_file():
            record["rejected"] = reasons_log.get(record["file"], {"reason": "unknown"})
        reason = decider.reason(record) if decider is not None else None
        if reason is not None:
            _reject(out_dir, record, reason)
            count += 1
        yield record
    if count:
        log.info("generate.filter: %d images set aside in %s", count, out_dir / REJECTED)


def _reject(out_dir: Path, record: dict[str, Any], reason: dict[str, Any]) -> None:
    """The reason first, then the move: an image in ``rejected/`` always has its reason."""
    (out_dir / REJECTED).mkdir(exist_ok=True)
    atomic.append_jsonl(out_dir / REJECTED / REASONS, {"file": record["file"], "rejected": reason})
    target = rejected_path(out_dir, record["file"])
    if target.exists():  # an older rejected copy of a redone image: keep it, never overwrite it
        _to_previous(out_dir, [record["file"]])
    with contextlib.suppress(FileNotFoundError):  # a concurrent merge moved it already
        os.replace(out_dir / record["file"], target)
    record["rejected"] = reason
