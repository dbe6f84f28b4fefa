"""Job records: ``jobs/<job_id>/job.json`` (what a job is, where its outputs go, every attempt it made) and
the user's index of job folders, so ``python -m sdcluster.logs <id>`` works from any directory.

Written by the login node at submission and by rank 0 of the job at each start and end, always through an
atomic rename, so a reader (``python -m sdcluster.logs``) never sees half a file. A requeued job keeps
its id, so its attempts accumulate in the same record and the history of preemptions stays readable.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sdcluster import atomic, paths

JOB_JSON = "job.json"
GONE = "RUNNING, but its process is gone (killed without a word, or the machine rebooted)"

# The states after which a job writes no more: the words of the records and of the schedulers (SLURM's).
TERMINAL = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
)


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


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The process's start in clock ticks since boot: with the pid it names one process, not a reused pid."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie has exited: only its entry remains


def start_attempt(folder: Path, restart_count: int, cpu_threads: int | None = None) -> None:
    """Open an attempt; ``cpu_threads`` is the thread count the job chose (None on GPUs).

    Passed in by the job rather than asked of :mod:`sdcluster.runtime.distributed`: the record is the
    bottom of the cluster wing, read on both sides, and imports nothing that runs inside a job.
    """
    record = read(folder)
    attempts = record.setdefault("attempts", [])
    pid = os.getpid()
    attempts.append(
        {
            "restart_count": restart_count,
            "host": socket.gethostname(),
            "pid": pid,
            "boot_id": _boot_id(),
            "process_start": _process_start(pid),
            "started": now(),
        }
    )
    if cpu_threads is not None:  # CPU runs repeat bit for bit only at the same thread count: on record
        attempts[-1]["cpu_threads"] = cpu_threads
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


def process_gone(attempt: dict[str, Any]) -> bool:
    """True when an open attempt's process is known to be gone (killed, or the machine rebooted).

    Only decidable on the host that ran it; elsewhere (another node) nothing is claimed.
    """
    if attempt.get("ended") or attempt.get("host") != socket.gethostname() or "pid" not in attempt:
        return False
    if attempt.get("boot_id") and attempt["boot_id"] != _boot_id():
        return True
    return _process_start(int(attempt["pid"])) != attempt.get("process_start")


def count_attempts(folder: Path, state: str) -> int:
    return sum(1 for a in read(folder).get("attempts", []) if a.get("state") == state)


def known_jobs(jobs_root: Path) -> dict[str, Path]:
    """Every job the user submitted, by id: those in the index (from any directory) and those in
    ``jobs_root``."""
    jobs = dict(indexed_jobs())
    jobs.update({p.name: p for p in jobs_root.glob("*") if (p / JOB_JSON).is_file()})
    return jobs


def index_job(job_id: str, folder: Path) -> None:
    """Remember where a job's folder is (``~/.sdcluster/jobs.tsv``, or under ``$SDCLUSTER_HOME``)."""
    path = paths.job_index()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(f"{job_id}\t{folder.resolve()}\n")


def indexed_jobs() -> list[tuple[str, Path]]:
    """(job id, folder) of every indexed job whose folder still exists, newest submission first."""
    index = paths.job_index()
    if not index.is_file():
        return []
    seen: dict[str, Path] = {}
    for line in reversed(index.read_text().splitlines()):
        job_id, _, folder = line.partition("\t")
        if job_id not in seen and (Path(folder) / JOB_JSON).is_file():
            seen[job_id] = Path(folder)
    return list(seen.items())


def find_job(job_id: str, jobs_root: Path) -> Path | None:
    """The folder of ``job_id`` under ``jobs_root`` or in the index; an array job's id finds its task 0."""
    for candidate in (job_id, f"{job_id}_0"):
        local = jobs_root / candidate
        if (local / JOB_JSON).is_file():
            return local
        for indexed, folder in indexed_jobs():
            if indexed == candidate:
                return folder
    return None


def array_tasks(job_id: str, jobs_root: Path) -> list[str]:
    """``<id>_0``, ``<id>_1``... when ``job_id`` is a job array's id (what submission printed), else []."""
    if "_" in job_id:
        return []
    prefix = f"{job_id}_"
    found = {p.name for p in jobs_root.glob(f"{prefix}*") if (p / JOB_JSON).is_file()}
    found |= {jid for jid, _ in indexed_jobs() if jid.startswith(prefix)}
    return sorted(found, key=lambda jid: int(jid[len(prefix) :]) if jid[len(prefix) :].isdigit() else -1)


def recorded_state(record: dict) -> str:
    """The recorded state, unless the record says RUNNING for a process that no longer exists."""
    state = record.get("state", "?")
    attempts = record.get("attempts") or []
    if state == "RUNNING" and attempts and process_gone(attempts[-1]):
        return GONE
    return state


def follow(
    path: Path,
    job_id: str,
    folder: Path,
    scheduler_state: Callable[[str], tuple[str, str] | None],
    poll_s: float = 2.0,
) -> None:
    """Print new log lines until the job reaches a terminal state (the scheduler's word, else the record's:
    ``scheduler_state`` is the job's backend's ``job_state``)."""
    offset = 0
    while True:
        if path.is_file():
            with path.open(errors="replace") as fh:
                fh.seek(offset)
                chunk = fh.read()
                offset = fh.tell()
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sched = scheduler_state(job_id)
        record = read(folder)
        state = sched[0] if sched else recorded_state(record)
        if state in TERMINAL or state == GONE:
            return
        time.sleep(poll_s)
