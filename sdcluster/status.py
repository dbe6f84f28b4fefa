"""Every recent job at a glance: state, step/total, last loss, ETA and where it runs (``sdcluster logs``).

A job's own records say most of it: ``job.json`` (state, host of each attempt, its sweep), the last progress
line of its rank-0 log (``step 20/40 | loss ... | eta 1m02s``) and its run's ``metrics.jsonl``. A scheduler
adds what only it knows, the live state and the node list, in one query for all listed jobs of its backend
(asking job by job would cost one controller round trip each).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdcluster import paths
from sdcluster.cluster import backends, records
from sdcluster.train import metrics

_PROGRESS = re.compile(r"\b(?:step|image) (\d+)/(\d+) \|.*\| eta (\S+)")
_TAIL_BYTES = 64 * 1024  # a generation log holds a line per batch: the last progress line is near the end


@dataclass(frozen=True)
class JobStatus:
    """One row of the listing."""

    job_id: str
    task: str
    state: str
    progress: str
    loss: str
    eta: str
    where: str
    submitted: str


def tail_progress(path: Path) -> tuple[str, str, str] | None:
    """(done, total, eta) of the last progress line of a log, read from its end."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - _TAIL_BYTES))
            text = fh.read().decode(errors="replace")
    except OSError:
        return None
    found = _PROGRESS.findall(text)
    return found[-1] if found else None


def scheduler_view(found: dict[str, dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """``{job_id: (state, node list)}``: one query per backend for all its listed jobs."""
    by_backend: dict[str, list[str]] = {}
    for job_id, record in found.items():
        by_backend.setdefault(str(record.get("cluster", "")), []).append(job_id)
    view: dict[str, tuple[str, str]] = {}
    for name, job_ids in by_backend.items():
        with contextlib.suppress(ValueError):  # a record naming no known backend: its own record says it
            view.update(backends.get(name).view(job_ids))
    return view


def _where(record: dict[str, Any], nodes: str | None, state: str) -> str:
    if nodes:
        return nodes
    attempts = record.get("attempts") or []
    if attempts and attempts[-1].get("host"):
        return attempts[-1]["host"]
    try:
        queued = not backends.get(str(record.get("cluster", ""))).foreground  # a scheduler holds it
    except ValueError:  # a record naming no known backend
        queued = False
    return "queued" if queued and state in ("PENDING", "SUBMITTED") else "-"


def row(job_id: str, folder: Path, record: dict[str, Any], scheduler: tuple[str, str] | None) -> JobStatus:
    """The status of one job from its records, and from its scheduler's view of it when there is one."""
    state = scheduler[0] if scheduler else records.recorded_state(record)
    if state == records.GONE:
        state = "DIED"
    progress = tail_progress(paths.job_log(folder, job_id, 0))
    loss = "-"
    if record.get("task") == "train" and record.get("run_dir"):
        train, _ = metrics.read(paths.RunPaths(Path(record["run_dir"])).metrics)
        loss = f"{train[-1][1]:.4f}" if train else "-"
    return JobStatus(
        job_id=job_id,
        task=str(record.get("task", "?")),
        state=state,
        progress=f"{progress[0]}/{progress[1]}" if progress else "-",
        loss=loss,
        eta=progress[2] if progress and state == "RUNNING" else "-",
        where=_where(record, scheduler[1] if scheduler else None, state),
        submitted=str(record.get("submitted", "?")).replace("T", " ")[:16],
    )


def recent(jobs_root: Path, limit: int = 20) -> list[JobStatus]:
    """The user's jobs, newest submission first: in the index (any directory) and under ``jobs_root``."""
    folders = records.known_jobs(jobs_root)
    found = {job_id: records.read(folder) for job_id, folder in folders.items()}
    newest = sorted(found, key=lambda job_id: found[job_id].get("submitted", ""), reverse=True)[:limit]
    view = scheduler_view({j: found[j] for j in newest})
    return [row(j, folders[j], found[j], view.get(j)) for j in newest]


def table(rows: list[list[str]]) -> list[str]:
    """Columns aligned to their widest cell; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def format_jobs(jobs: list[JobStatus]) -> list[str]:
    header = ["job", "task", "state", "progress", "loss", "eta", "where", "submitted"]
    cells = [[j.job_id, j.task, j.state, j.progress, j.loss, j.eta, j.where, j.submitted] for j in jobs]
    return table([header, *cells])
