"""The on-disk format of checkpoints: ``step-NNNNNNNN`` folders that exist only when complete.

accelerate's ``save_state`` writes straight into its target folder and its ``total_limit`` deletes old
checkpoints *before* the new one exists, so a job killed mid-save can leave a newer, broken folder that a
naive "highest number wins" resume picks. We therefore use ``save_state`` only for what it does well (model,
optimizer, scaler, per-rank RNG, gathered on every rank) and wrap it:

1. every rank saves into ``.tmp-step-N`` (rank 0 creates it fresh);
2. rank 0 writes the extra state and ``sdcluster-checkpoint.json`` listing every file, its size and
   sha256, sealed by a digest over the manifest itself (:func:`seal`), then publishes the folder as
   ``step-N`` in one rename (:func:`sdcluster.atomic.publish_dir`) and updates the ``latest`` pointer;
3. only then does rank 0 prune, keeping at least ``keep`` (>= 2) complete checkpoints.

Folders are listed newest first; one whose manifest is missing, does not agree with itself (digest, folder
name, step and micro-step: :func:`checkpoint_manifest_problem`) or whose files do not match it
(:func:`sdcluster.sealed.files_problem`) is skipped with a warning naming it, so a truncated or edited
newest checkpoint falls back to the previous one. Which folder a run resumes from, and what else it saves,
is decided by :mod:`sdcluster.train.checkpointer`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdcluster import atomic, sealed
from sdcluster.config import ConfigError

log = logging.getLogger("sdcluster")

META_NAME = "sdcluster-checkpoint.json"
"""The checkpoint manifest: a sealed folder's file list (:mod:`sdcluster.sealed`) plus the step it holds."""
# 2: the manifest carries a digest over itself and where its micro-step count starts (origin_*). A manifest
# without ``format`` was written before; it is accepted, its own fields checked only against its folder name.
FORMAT = 2
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
    # Where the run's current shape (world size, batch size, accumulation) began: (0, 0) unless a resume
    # changed it. From there each optimizer step is exactly ``grad_accum`` micro-steps.
    origin_step: int = 0
    origin_micro_step: int = 0
    format: int | None = FORMAT  # None: an older manifest (see FORMAT)
    digest: str | None = None  # sha256 of the manifest without this field (:func:`seal`)

    def expected_micro_step(self) -> int:
        return self.origin_micro_step + (self.step - self.origin_step) * self.grad_accum


def _file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    files = (p for p in folder.rglob("*") if p.is_file() and p.name != META_NAME)
    return sealed.file_entries(folder, files)


def _digest(data: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a manifest without its ``digest``: any edited value changes it."""
    body = {key: value for key, value in data.items() if key != "digest"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def seal(meta: CheckpointMeta) -> dict[str, Any]:
    """The manifest as written: ``meta`` in the current format with its digest. Digested after a JSON round
    trip, so the reader hashes exactly the values it reads back."""
    data = json.loads(json.dumps(asdict(meta) | {"format": FORMAT, "digest": None}, default=str))
    return data | {"digest": _digest(data)}


def read_meta(folder: Path) -> CheckpointMeta:
    return CheckpointMeta(**{"format": None} | json.loads((folder / META_NAME).read_text()))


def checkpoint_manifest_problem(
    folder: Path, meta: CheckpointMeta, data: dict[str, Any], named: bool = True
) -> str | None:
    """Why the manifest ``data`` (read as ``meta``) of ``folder`` does not agree with itself, or None.

    The file list proves the other files; this proves the manifest: an edited step would otherwise resume
    at a step its weights, optimizer and data position were never at. ``named``: the folder is a ``step-N``
    of a run, whose name orders it and must say its step; a folder given as ``train.resume=PATH`` may be
    called anything (a copy kept as ``best/``).
    """
    if meta.format is not None:  # an older manifest has no digest (see FORMAT)
        if not data.get("digest"):
            return f"{META_NAME} has no digest (edited)"
        if data["digest"] != _digest(data):
            return f"{META_NAME} does not match its own digest (edited or corrupt)"
    if named and folder.name != step_name(meta.step):
        return f"named {folder.name}, its manifest says step {meta.step} (folder renamed or manifest edited)"
    consistent = meta.micro_step == meta.expected_micro_step() and 0 <= meta.origin_step <= meta.step
    if meta.format is not None and not consistent:
        return (
            f"micro-step {meta.micro_step} does not follow from step {meta.step} "
            f"(expected {meta.expected_micro_step()}: inconsistent manifest)"
        )
    return None


def verify(folder: Path, content: bool = False, named: bool = True) -> str | None:
    """Why ``folder`` cannot be trusted, or None when its manifest agrees with itself and every listed file
    is there at its size and, with ``content``, its sha256 (a flipped byte of the right size, e.g. in an RNG
    state, shows only there).

    Listing and pruning check the manifest and sizes; resume also checks content before loading anything.
    """
    try:
        data = json.loads((folder / META_NAME).read_text())
        meta = CheckpointMeta(**{"format": None} | data)
    except FileNotFoundError:
        return f"no {META_NAME} (save did not finish)"
    except (ValueError, TypeError) as err:
        return f"unreadable {META_NAME}: {err}"
    problem = checkpoint_manifest_problem(folder, meta, data, named)
    if problem:
        return problem
    if not meta.files:
        return "manifest lists no files"
    # a manifest written before checksums lists a file by its size alone
    files = {name: {"bytes": e} if isinstance(e, int) else e for name, e in meta.files.items()}
    return sealed.files_problem(folder, files, content)


def resume_folder(resume: str) -> Path:
    """The checkpoint ``train.resume=PATH`` names, verified: on the login node and again in the job."""
    folder = Path(resume).expanduser()
    problem = verify(folder, named=False) if folder.is_dir() else "does not exist"
    if problem:
        raise ConfigError(
            f"train.resume: {folder} {problem}. Fix: use train.resume=auto or another checkpoint folder"
        )
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
    write_shards: Callable[[Path], None] | None = None,
) -> Path:
    """Save on every rank (accelerate requires it), commit on rank 0. Returns the final folder.

    ``write_shards`` runs on every rank after ``save_state``: each writes its own files of a sharded state
    (``torch.distributed.checkpoint``) into the same temporary folder, so the manifest lists and checksums
    them like any other file and they are published, or not, with the rest.
    """
    final = root / step_name(meta.step)
    tmp = root / f".tmp-{step_name(meta.step)}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    resume = ": it resumes from the newest complete checkpoint"
    partial = tmp if accelerator.is_main_process else None
    # the previous checkpoint stays untouched
    with atomic.explain_disk_full(final, partial, resume, setting="output_root"):
        accelerator.save_state(str(tmp), safe_serialization=True)
        if write_shards is not None:
            write_shards(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            meta.extra = write_extra(tmp)
            _commit(tmp, final, meta)
            prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def _commit(tmp: Path, final: Path, meta: CheckpointMeta) -> None:
    meta.files = _file_entries(tmp)
    assert meta.micro_step == meta.expected_micro_step(), "the loop's step and micro-step counts diverged"
    atomic.write_json(tmp / META_NAME, seal(meta))
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
