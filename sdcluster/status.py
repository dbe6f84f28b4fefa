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
    cluster: str = "?"  # the cluster it was submitted to, "?" when its index line predates clusters


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
    """``{job_id: (state, node list)}``: one query per backend for all its listed jobs (only jobs of the
    clusters this machine reaches: another cluster's id may name another job here)."""
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


def row(job: records.Indexed, record: dict[str, Any], scheduler: tuple[str, str] | None) -> JobStatus:
    """The status of one job from its records, and from its scheduler's view of it when there is one."""
    job_id, folder = job.job_id, job.folder
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
        cluster=job.cluster or "?",
    )


def recent(jobs_root: Path, limit: int = 20) -> list[JobStatus]:
    """The user's jobs, newest submission first: in the index (any directory) and under ``jobs_root``."""
    jobs = records.known_entries(jobs_root)
    found = [records.read(job.folder) for job in jobs]
    newest = sorted(range(len(jobs)), key=lambda i: found[i].get("submitted", ""), reverse=True)[:limit]
    here = backends.clusters_here() if any(jobs[i].cluster for i in newest) else set()
    asked = [i for i in newest if jobs[i].cluster is None or jobs[i].cluster in here]
    view = scheduler_view({jobs[i].job_id: found[i] for i in asked})
    return [row(jobs[i], found[i], view.get(jobs[i].job_id) if i in asked else None) for i in newest]


def table(rows: list[list[str]]) -> list[str]:
    """Columns aligned to their widest cell; the first row is the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def format_jobs(jobs: list[JobStatus]) -> list[str]:
    """The listing; a cluster column only when the jobs come from more than one cluster (a shared home)."""
    header = ["job", "task", "state", "progress", "loss", "eta", "where", "submitted"]
    cells = [[j.job_id, j.task, j.state, j.progress, j.loss, j.eta, j.where, j.submitted] for j in jobs]
    if len({j.cluster for j in jobs} - {"?"}) > 1:
        header.append("cluster")
        cells = [[*c, j.cluster] for c, j in zip(cells, jobs, strict=True)]
    return table([header, *cells])
