"""A sweep's ledger, ``outputs/sweeps/<id>/sweep.json``: where it is, what it says, and each point's state.

Read by the resubmit command (:mod:`sdcluster.sweep.points`) and the report (:mod:`sdcluster.sweep.report`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sdcluster import atomic, paths
from sdcluster.cluster import backends, records
from sdcluster.config import Config, ConfigError, store

SWEEP_JSON = "sweep.json"
FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "LOST"}


def write(sweep_dir: Path, record: dict[str, Any]) -> None:
    atomic.write_json(sweep_dir / SWEEP_JSON, record)


def find(target: str, output_root: Path = Path("outputs"), jobs_root: Path = Path("jobs")) -> Path:
    """A sweep folder from its path, its id (under ``output_root``), or the id of any of its jobs (a job
    array's id as submission printed it, one task's ``<id>_<k>``, found here or through the job index)."""
    for folder in (Path(target), paths.sweep_dir(output_root, target)):
        if (folder / SWEEP_JSON).is_file():
            return folder
    job_folder = records.find_job(target, jobs_root)
    sweep = records.read(job_folder).get("sweep") if job_folder else None
    if sweep and (Path(sweep) / SWEEP_JSON).is_file():
        return Path(sweep)
    raise ConfigError(
        f"no sweep at {target!r} (a sweep folder, a sweep id, or a job id of one of its points). "
        "Fix: give the folder that submission printed, or --output-root/--jobs-root if they were moved"
    )


def load(folder: Path) -> dict[str, Any]:
    return json.loads((folder / SWEEP_JSON).read_text())


def point_config(point: dict[str, Any]) -> Config:
    """Rebuild a point's typed config from the ledger (checks run again as at launch)."""
    return OmegaConf.to_object(OmegaConf.merge(store.schema_for(point["config"]), point["config"]))


def _queued(record: dict) -> bool:
    """Whether a scheduler held the job (it would know of it while it lives)."""
    try:
        return not backends.get(str(record.get("cluster", ""))).foreground
    except ValueError:
        return False


def job_state(job_id: str, jobs_root: Path) -> str:
    """The scheduler's word when it has one, else what the job recorded."""
    sched = backends.job_state(job_id)
    if sched:
        return sched[0]
    folder = records.find_job(job_id, jobs_root)
    record = records.read(folder) if folder else {}
    state = record.get("state", "UNKNOWN")
    if _queued(record) and state in ("SUBMITTED", "RUNNING"):
        # The scheduler does not know it: an array task cancelled while pending leaves no record at all.
        return "LOST"
    return state


def user_sweeps(output_root: Path = Path("outputs"), jobs_root: Path = Path("jobs")) -> list[Path]:
    """The user's sweep folders, newest first: every sweep an indexed job belongs to (any directory), and
    those under ``output_root``."""
    folders = {Path(p) for p in (output_root / "sweeps").glob(f"*/{SWEEP_JSON}")}
    for folder in records.known_jobs(jobs_root).values():
        sweep = records.read(folder).get("sweep")
        if sweep:
            folders.add(Path(sweep) / SWEEP_JSON)
    found = [ledger.parent for ledger in folders if ledger.is_file()]
    return sorted(found, key=lambda folder: load(folder).get("created", ""), reverse=True)
