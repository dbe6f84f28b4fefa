"""``jobs/<job_id>/job.json``: what a job is, where its outputs go, and every attempt it made.

Written by the login node at submission and by rank 0 of the job at each start and end, always through an
atomic rename, so a reader (``python -m sdcluster.logs``) never sees half a file. A requeued SLURM job keeps
its id, so its attempts accumulate in the same record and the history of preemptions stays readable.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from sdcluster import atomic

JOB_JSON = "job.json"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def read(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / JOB_JSON).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write(folder: Path, record: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic.write_json(folder / JOB_JSON, record)


def update(folder: Path, fields: dict[str, Any], keep_existing: bool = False) -> dict[str, Any]:
    """Merge ``fields`` into the record; with ``keep_existing`` only fill keys that are not set yet.

    The login node writes with ``keep_existing`` because a fast job may already have recorded its state.
    """
    record = read(folder)
    for key, value in fields.items():
        if not (keep_existing and key in record):
            record[key] = value
    _write(folder, record)
    return record


def start_attempt(folder: Path, restart_count: int) -> None:
    record = read(folder)
    attempts = record.setdefault("attempts", [])
    attempts.append({"restart_count": restart_count, "host": socket.gethostname(), "started": now()})
    record.update(state="RUNNING", restart_count=restart_count)
    _write(folder, record)


def end_attempt(folder: Path, state: str, **details: Any) -> None:
    """Close the current attempt: ``state`` is COMPLETED, FAILED, PREEMPTED or TIMEOUT (+ reason, step...)."""
    record = read(folder)
    attempts = record.setdefault("attempts", [{"started": None}])
    attempts[-1].update(ended=now(), state=state, **details)
    record["state"] = state
    record.update({k: v for k, v in details.items() if k in ("step", "exit_reason", "outputs")})
    _write(folder, record)


def count_attempts(folder: Path, state: str) -> int:
    return sum(1 for a in read(folder).get("attempts", []) if a.get("state") == state)


def list_jobs(jobs_root: Path) -> list[tuple[str, dict[str, Any]]]:
    """(job_id, record) of every job folder, newest first."""
    if not jobs_root.is_dir():
        return []
    folders = [p for p in jobs_root.iterdir() if p.is_dir() and (p / JOB_JSON).is_file()]
    folders.sort(key=lambda p: (p / JOB_JSON).stat().st_mtime, reverse=True)
    return [(p.name, read(p)) for p in folders]
