"""A sweep's ledger, ``outputs/sweeps/<id>/sweep.json``: where it is, what it says, and each point's state.

Read by the resubmit command (:mod:`sdcluster.sweep`) and by the report (:mod:`sdcluster.sweep_report`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sdcluster import atomic, ledger
from sdcluster.config import Config, ConfigError

SWEEP_JSON = "sweep.json"
FAILED = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "LOST"}


def write(sweep_dir: Path, record: dict[str, Any]) -> None:
    atomic.write_json(sweep_dir / SWEEP_JSON, record)


def find(target: str, outputs: Path = Path("outputs")) -> Path:
    """A sweep folder from its path, its id, or the id of any of its jobs."""
    candidates = [Path(target), outputs / "sweeps" / target]
    for folder in candidates:
        if (folder / SWEEP_JSON).is_file():
            return folder
    from sdcluster.logs import find_job

    job_folder = find_job(target, Path("jobs"))
    sweep = ledger.read(job_folder).get("sweep") if job_folder else None
    if sweep and (Path(sweep) / SWEEP_JSON).is_file():
        return Path(sweep)
    raise ConfigError(
        f"no sweep at {target!r} (a sweep folder, a sweep id, or a job id of one of its points)"
    )


def load(folder: Path) -> dict[str, Any]:
    return json.loads((folder / SWEEP_JSON).read_text())


def point_config(point: dict[str, Any]) -> Config:
    """Rebuild a point's typed config from the ledger (checks run again as at launch)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), point["config"]))


def job_state(job_id: str, jobs_root: Path) -> str:
    """The scheduler's word when it has one, else what the job recorded."""
    from sdcluster.logs import find_job, scheduler_state

    sched = scheduler_state(job_id)
    if sched:
        return sched[0]
    folder = find_job(job_id, jobs_root)
    record = ledger.read(folder) if folder else {}
    state = record.get("state", "UNKNOWN")
    if record.get("cluster") == "slurm" and state in ("SUBMITTED", "RUNNING"):
        # Neither sacct nor squeue knows it: an array task cancelled while pending leaves no record at all.
        return "LOST"
    return state
