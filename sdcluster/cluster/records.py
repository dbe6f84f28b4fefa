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
from dataclasses import dataclass
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


def _came_back(attempts: list[dict[str, Any]], restart_count: int) -> None:
    """Correct the previous attempt to PREEMPTED when a job recorded CANCELLED comes back requeued.

    A job that got a stop signal (SLURM's SIGTERM) asks the scheduler whether it is being preempted and how
    the site ends preempted jobs; where the scheduler did not say, it records CANCELLED. A later attempt of
    the same job with a higher restart count is the scheduler's answer: it was requeued, i.e. preempted.
    """
    last = attempts[-1] if attempts else {}
    if (
        last.get("state") == "CANCELLED"
        and not last.get("requeued")
        and restart_count > last.get("restart_count", restart_count)
    ):
        last.update(state="PREEMPTED", requeued=True, exit_reason=f"preempted ({last.get('exit_reason')})")


def start_attempt(folder: Path, restart_count: int, cpu_threads: int | None = None) -> None:
    """Open an attempt; ``cpu_threads`` is the thread count the job chose (None on GPUs).

    Passed in by the job rather than asked of :mod:`sdcluster.runtime.distributed`: the record is the
    bottom of the cluster wing, read on both sides, and imports nothing that runs inside a job.
    """
    record = read(folder)
    attempts = record.setdefault("attempts", [])
    _came_back(attempts, restart_count)
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
    """Close the current attempt: ``state`` is COMPLETED, FAILED, PREEMPTED, TIMEOUT or CANCELLED (+ reason,
    step...)."""
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


@dataclass(frozen=True)
class Indexed:
    """One line of the user's job index: a job id, its folder, and the cluster it was submitted to."""

    job_id: str
    folder: Path
    cluster: str | None  # None: a line written before the index recorded clusters (or none answered)


def index_job(job_id: str, folder: Path, cluster: str | None = None) -> None:
    """Remember where a job's folder is (``~/.sdcluster/jobs.tsv``, or under ``$SDCLUSTER_HOME``) and on
    which cluster (``Backend.cluster_name``): a home shared between clusters sees the same id on each."""
    path = paths.job_index()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write("\t".join([job_id, str(folder.resolve()), *([cluster] if cluster else [])]) + "\n")


def index_entries() -> list[Indexed]:
    """Every indexed job whose folder still exists, newest submission first, one per id and cluster.

    Lines of two columns (written before clusters were recorded) read as of an unknown cluster.
    """
    index = paths.job_index()
    if not index.is_file():
        return []
    seen: dict[tuple[str, str | None], Indexed] = {}
    for line in reversed(index.read_text().splitlines()):
        job_id, folder, cluster = [*line.split("\t"), "", ""][:3]
        key = (job_id, cluster or None)
        if folder and key not in seen and (Path(folder) / JOB_JSON).is_file():
            seen[key] = Indexed(job_id, Path(folder), cluster or None)
    return list(seen.values())


def indexed_jobs() -> list[tuple[str, Path]]:
    """(job id, folder) of every indexed job whose folder still exists, newest submission first; of an id
    known on several clusters, the newest."""
    seen: dict[str, Path] = {}
    for entry in index_entries():
        seen.setdefault(entry.job_id, entry.folder)
    return list(seen.items())


@dataclass(frozen=True)
class Found:
    """Where one job id was found: the working directory's jobs root, or one cluster's index lines."""

    cluster: str | None  # None: not known (a folder never indexed, or indexed before clusters were)
    folders: dict[str, Path]  # the job itself, or a job array's tasks ``<id>_<k>`` in order
    here: bool  # under the jobs root asked for (the working directory's ``jobs/``)


def _of_job(job_id: str, task_id: str) -> bool:
    """True when ``task_id`` is ``job_id`` or, for a job array's id, one of its tasks."""
    if task_id == job_id:
        return True
    array, _, index = task_id.partition("_")
    return "_" not in job_id and array == job_id and index.isdigit()


def _in_order(folders: dict[str, Path]) -> dict[str, Path]:
    def task(job_id: str) -> int:
        index = job_id.rpartition("_")[2]
        return int(index) if "_" in job_id and index.isdigit() else -1  # the job itself first

    return {k: folders[k] for k in sorted(folders, key=task)}


def locate(job_id: str, jobs_root: Path) -> list[Found]:
    """Every place ``job_id`` (or a job array's id) is known: under ``jobs_root`` first, then one entry per
    cluster of the index, newest first. Which one a user means is the caller's choice (``sdcluster logs``
    prefers the jobs root, then the cluster it can reach)."""
    entries = [e for e in index_entries() if _of_job(job_id, e.job_id)]
    here = {p.name: p for p in jobs_root.glob(f"{job_id}*") if (p / JOB_JSON).is_file()}
    here = {k: v for k, v in here.items() if _of_job(job_id, k)}
    resolved = {p.resolve() for p in here.values()}
    found = []
    if here:
        clusters = {e.cluster for e in entries if e.folder.resolve() in resolved}
        found.append(Found(next(iter(clusters)) if len(clusters) == 1 else None, _in_order(here), True))
    by_cluster: dict[str | None, dict[str, Path]] = {}
    for entry in entries:
        if entry.folder.resolve() not in resolved:
            by_cluster.setdefault(entry.cluster, {}).setdefault(entry.job_id, entry.folder)
    found += [Found(cluster, _in_order(folders), False) for cluster, folders in by_cluster.items()]
    return found


def known_entries(jobs_root: Path) -> list[Indexed]:
    """Every job the user submitted, one entry per id and cluster: the index's, then the jobs under
    ``jobs_root`` that it lacks (of an unknown cluster)."""
    entries = index_entries()
    indexed = {e.folder.resolve() for e in entries}
    for folder in jobs_root.glob("*"):
        if (folder / JOB_JSON).is_file() and folder.resolve() not in indexed:
            entries.append(Indexed(folder.name, folder, None))
    return entries


def find_job(job_id: str, jobs_root: Path) -> Path | None:
    """The folder of ``job_id`` under ``jobs_root``, else the newest in the index; an array job's id finds
    its first task."""
    found = locate(job_id, jobs_root)
    return next(iter(found[0].folders.values())) if found else None


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
