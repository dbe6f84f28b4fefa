"""One writer per run folder (and per generation folder): the job that holds it is named in the folder.

Two launches of one run would interleave ``metrics.jsonl``, move each other's files to ``previous/`` and
export into one ``model/``. So the folder records its holder in ``.sdcluster-owner.json`` (job id, cluster,
jobs folder): the login node refuses a second live launch before anything is queued, naming the holder and
how to look at it; the job itself checks again when it starts (two launches can race past the login check).
A holder that is finished or dead (by the scheduler's record, or the process table for a local job) is taken
over; a requeued attempt of the holding job (or, for generation shards, another task of its array) is the
holder and re-enters.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from sdcluster import atomic
from sdcluster.cluster import backends, records
from sdcluster.config import ConfigError

OWNER = ".sdcluster-owner.json"


def read_holder(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / OWNER).read_text())
    except (OSError, ValueError):
        return None


def _array_base(job_id: str) -> str:
    return job_id.split("_", 1)[0]


def _process_alive(holder: dict[str, Any]) -> bool:
    """A foreground job's id is its controller's pid (submitit); its recorded attempt tells a reused pid
    apart."""
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process table cannot be read: assume it runs
    folder = Path(holder.get("jobs_folder", ""))
    attempts = records.read(folder).get("attempts") or []
    if attempts and (attempts[-1].get("ended") or records.process_gone(attempts[-1])):
        return False
    try:
        os.kill(int(holder["job_id"]), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:  # someone else's process has that pid now
        return False
    return True


def live_state(holder: dict[str, Any]) -> str | None:
    """The holder's state while it may still write (pending, running, requeued), else None."""
    backend = backends.get(holder.get("cluster", ""))
    if backend.foreground:  # a process of the launching machine: no scheduler to ask
        return "RUNNING" if _process_alive(holder) else None
    states = backend.job_states(str(holder["job_id"]))  # an array's id covers all its tasks
    if states is None:  # no answer from the scheduler: the job's own record is all there is
        state = records.read(Path(holder.get("jobs_folder", ""))).get("state")
        return state if state in ("SUBMITTED", "RUNNING") else None
    alive = [s for s in states if s in backends.LIVE]
    return alive[0] if alive else None


def writer_id(job_id: str, whole_array: bool) -> str:
    """Who writes the folder: the job (array task ``123_4``: a sweep point's run), or, for a folder that all
    tasks of an array fill together (generation shards), the whole array (``123``)."""
    return _array_base(job_id) if whole_array else job_id


def claim(folder: Path, job_id: str, cluster: str, jobs_folder: Path, whole_array: bool = False) -> None:
    """Record the writer of ``folder`` (written atomically; the folder is created if needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    holder = {
        "job_id": writer_id(job_id, whole_array),
        "cluster": cluster,
        "jobs_folder": str(jobs_folder),
        "host": socket.gethostname(),
    }
    atomic.write_json(folder / OWNER, {**holder, "since": records.now()})


def check_free(folder: Path, key: str) -> None:
    """Login node: refuse a launch whose folder is held by a live job, before anything is queued."""
    holder = read_holder(folder)
    state = live_state(holder) if holder else None
    if holder and state:
        job_id = holder["job_id"]
        stop = backends.get(holder.get("cluster", "")).stop_hint(job_id)
        raise ConfigError(
            f"{key}: {folder} is in use by job {job_id} ({state}); two writers would mix their files. "
            f"Fix: follow it (python -m sdcluster.logs {job_id} --follow) and run the same command once it "
            f"ended, or stop it first ({stop})"
        )


def enter(
    folder: Path, job_id: str | None, cluster: str, jobs_folder: Path | None, whole_array: bool = False
) -> None:
    """In the job: go on if the folder is free, held by a dead or finished job, or by this job (a requeued
    attempt; with ``whole_array``, another task of its array); else stop before writing anything."""
    if job_id is None:  # called outside a job (tests, a notebook): nothing to hold
        folder.mkdir(parents=True, exist_ok=True)
        return
    holder = read_holder(folder)
    if holder and str(holder["job_id"]) != writer_id(job_id, whole_array) and live_state(holder):
        raise RuntimeError(
            f"{folder} is in use by job {holder['job_id']}: this job stops before writing. "
            f"Fix: python -m sdcluster.logs {holder['job_id']}, then run the same command once it ended"
        )
    claim(folder, job_id, cluster, jobs_folder or Path(), whole_array)
