"""The on-disk format of checkpoints: ``step-NNNNNNNN`` folders that exist only when complete.

accelerate's ``save_state`` writes straight into its target folder and its ``total_limit`` deletes old
checkpoints *before* the new one exists, so a job killed mid-save can leave a newer, broken folder that a
naive "highest number wins" resume picks. We therefore use ``save_state`` only for what it does well (model,
optimizer, scaler, per-rank RNG, gathered on every rank) and wrap it:

1. every rank saves into ``.tmp-step-N`` (rank 0 creates it fresh);
2. rank 0 writes the extra state and ``sdcluster-checkpoint.json`` listing every file, its size and
   sha256, then publishes the folder as ``step-N`` in one rename (:func:`sdcluster.atomic.publish_dir`)
   and updates the ``latest`` pointer;
3. only then does rank 0 prune, keeping at least ``keep`` (>= 2) complete checkpoints.

Folders are listed newest first; one whose manifest is missing or whose files do not match it is skipped
with a warning naming it, so a truncated newest checkpoint falls back to the previous one. Which folder a
run resumes from, and what else it saves, is decided by :mod:`sdcluster.train.checkpointer`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdcluster import atomic
from sdcluster.config import ConfigError

log = logging.getLogger("sdcluster")

META_NAME = "sdcluster-checkpoint.json"
_STEP_RE = re.compile(r"^step-(\d{8})$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass
class CheckpointMeta:
    """Human-readable record of a checkpoint, and what resume checks before trusting it."""

    step: int
    micro_step: int
    config_hash: str
    world_size: int
    batch_size: int
    grad_accum: int
    job_id: str | None = None
    time: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    files: dict[str, Any] = field(default_factory=dict)  # name -> {"bytes", "sha256"} (older: bytes only)
    extra: dict[str, Any] = field(default_factory=dict)


def _file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": atomic.file_sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != META_NAME
    }


def read_meta(folder: Path) -> CheckpointMeta:
    return CheckpointMeta(**json.loads((folder / META_NAME).read_text()))


def verify(folder: Path, content: bool = False) -> str | None:
    """Why ``folder`` cannot be trusted, or None when every listed file is there at its size and, with
    ``content``, its sha256 (a flipped byte of the right size, e.g. in an RNG state, shows only there).

    Listing and pruning check sizes only; resume checks content before loading anything.
    """
    try:
        meta = read_meta(folder)
    except FileNotFoundError:
        return f"no {META_NAME} (save did not finish)"
    except (ValueError, TypeError) as err:
        return f"unreadable {META_NAME}: {err}"
    if not meta.files:
        return "manifest lists no files"
    for name, entry in meta.files.items():
        size, sha256 = (entry, None) if isinstance(entry, int) else (entry["bytes"], entry["sha256"])
        path = folder / name
        if not path.is_file():
            return f"missing {name}"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, manifest says {size} (truncated or corrupt)"
        if content and sha256 and atomic.file_sha256(path) != sha256:
            return f"{name} does not match its sha256 (corrupt)"
    return None


def resume_folder(resume: str) -> Path:
    """The checkpoint ``train.resume=PATH`` names, verified: on the login node and again in the job."""
    folder = Path(resume).expanduser()
    problem = verify(folder) if folder.is_dir() else "does not exist"
    if problem:
        raise ConfigError(f"train.resume: {folder} {problem}. Fix: use train.resume=auto or a step-* folder")
    return folder


def list_checkpoints(root: Path) -> list[Path]:
    """``step-*`` folders, newest first (temporary folders are never listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name)]
    return sorted(found, key=lambda p: p.name, reverse=True)


def complete_checkpoints(root: Path, warn: bool = True) -> list[Path]:
    """Checkpoints that pass :func:`verify`, newest first; bad ones are named in a warning."""
    good = []
    for folder in list_checkpoints(root):
        problem = verify(folder)
        if problem is None:
            good.append(folder)
        elif warn:
            log.warning("checkpoint %s is not usable (%s); falling back to an older one", folder, problem)
    return good


def save(
    accelerator: Any,
    root: Path,
    meta: CheckpointMeta,
    write_extra: Callable[[Path], dict[str, Any]],
    keep: int,
) -> Path:
    """Save on every rank (accelerate requires it), commit on rank 0. Returns the final folder."""
    final = root / step_name(meta.step)
    tmp = root / f".tmp-{step_name(meta.step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    resume = ": it resumes from the newest complete checkpoint"
    partial = tmp if accelerator.is_main_process else None
    with atomic.explain_disk_full(final, partial, resume):  # the previous checkpoint stays untouched
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            meta.extra = write_extra(tmp)
            _commit(tmp, final, meta)
            prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def _commit(tmp: Path, final: Path, meta: CheckpointMeta) -> None:
    meta.files = _file_entries(tmp)
    atomic.write_json(tmp / META_NAME, asdict(meta))
    # An existing ``final`` is a leftover of an earlier attempt at the same step: replaced whole, never mixed.
    atomic.publish_dir(tmp, final)
    atomic.write_text(final.parent / "latest", final.name + "\n")
    log.info("checkpoint saved: %s", final)


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints, plus leftovers of interrupted saves.

    Runs only after a save committed, so the newest checkpoint always exists before anything is deleted.
    Incomplete folders newer than the newest complete one are left for inspection until a later save passes
    them. ``keep`` is at least 2 so a bad newest checkpoint always has a fallback.
    """
    keep = max(keep, 2)
    complete = complete_checkpoints(root, warn=False)
    removed = complete[keep:]
    newest_ok = complete[0].name if complete else ""
    for folder in list_checkpoints(root):
        if folder not in complete and folder.name < newest_ok:
            removed.append(folder)
    for leftover in root.glob(".tmp-step-*"):
        if leftover.name[len(".tmp-") :] < newest_ok:
            removed.append(leftover)
    removed += list(root.glob(".old-step-*"))
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed
