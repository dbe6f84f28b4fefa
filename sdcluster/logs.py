"""Read a job's story by its id: ``sdcluster logs 5256095 [--follow] [--task N] [--err]``.

Prints the scheduler's state and exit code (asked through the job's backend), the attempts recorded in
``job.json`` (requeues and their reasons), the last progress line, where the outputs are, and the log itself.
A job array's id (what submission printed) lists its tasks and shows the first. Without an id it shows the
user's recent jobs at a glance (state, step/total, last loss, ETA, where: :mod:`sdcluster.status`) and their
sweeps. ``python -m sdcluster.logs`` is the same command. Works from any directory: submissions are indexed
in ``~/.sdcluster/jobs.tsv`` (override with ``SDCLUSTER_HOME``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from sdcluster import paths
from sdcluster.cluster import backends, records
from sdcluster.train import metrics

_PROGRESS = re.compile(r"(step \d+/\d+ \|.*)$")
# host: where rank 0 ran; cpu_threads: a CPU run repeats bit for bit only at the same thread count;
# failed_node/failed_rank: where a failure happened, error: what rank 0 caught of it.
_ATTEMPT_FIELDS = ("state", "step", "exit_reason", "requeued", "failed_node", "failed_rank", "error")
_ATTEMPT_FIELDS += ("host", "cpu_threads")


def last_progress(path: Path) -> str | None:
    if not path.is_file():
        return None
    found = None
    for line in path.read_text(errors="replace").splitlines():
        match = _PROGRESS.search(line)
        if match:
            found = match.group(1)
    return found


def _scheduler_state(record: dict, job_id: str, ask: bool = True) -> tuple[str, str] | None:
    """What the scheduler of the record's backend says of ``job_id`` (None without one to ask, or with
    ``ask`` false: a job of another cluster, whose id may name another job here)."""
    if not ask:
        return None
    try:
        return backends.get(str(record.get("cluster", ""))).job_state(job_id)
    except ValueError:  # a record naming no known backend: its own record is all there is
        return None


def _never_ran(record: dict, sched: tuple[str, str] | None) -> str | None:
    """Why a dependent job never started: the job it waited on (``afterok``) did not complete."""
    after = record.get("after")
    if not after or record.get("attempts") or sched is None or sched[0] not in ("CANCELLED", "PENDING"):
        return None
    upstream = _scheduler_state(record, after)  # the job it waited on ran on the same backend
    if upstream is None or upstream[0] in ("COMPLETED", "PENDING", "RUNNING"):
        return None
    return f"  never ran: it waited (afterok) on job {after}, which ended {upstream[0]}"


def summary(job_id: str, folder: Path, task: int = 0, ask: bool = True) -> list[str]:
    """One job's story; ``ask``: its scheduler is the one this machine reaches (else only its records)."""
    record = records.read(folder)
    lines = [f"job {job_id}: {record.get('task', '?')} on {record.get('cluster', '?')}"]
    sched = _scheduler_state(record, job_id, ask)
    if sched:
        lines.append(f"  scheduler state: {sched[0]}" + (f" (exit code {sched[1]})" if sched[1] else ""))
    lines.append(f"  recorded state:  {records.recorded_state(record)}")
    never = _never_ran(record, sched)
    if never:
        lines.append(never)
    attempts = record.get("attempts", [])
    for i, attempt in enumerate(attempts, 1):
        details = ", ".join(f"{k} {attempt[k]}" for k in _ATTEMPT_FIELDS if k in attempt)
        lines.append(f"  attempt {i} (restart {attempt.get('restart_count', 0)}): {details}")
    if attempts and attempts[-1].get("state") == "CANCELLED" and "step" in attempts[-1]:
        # only the job itself records a step: it stopped at a boundary and saved (scancel, or preempted
        # where the site cancels); the scheduler's own CANCELLED (before a start, a kill) has none
        lines.append("  stopped early, its work saved: the same command resumes it")
    progress = last_progress(paths.job_log(folder, job_id, task))
    if progress:
        lines.append(f"  last progress:   {progress}")
    if record.get("run_dir"):
        _, val = metrics.read(paths.RunPaths(Path(record["run_dir"])).metrics)
        if val:
            best = min(val, key=lambda point: point[1])
            lines.append(
                f"  validation:      step {val[-1][0]} val_loss {val[-1][1]:.4f} "
                f"(best {best[1]:.4f} at step {best[0]})"
            )
    for key, value in {**{"run_dir": record.get("run_dir")}, **record.get("outputs", {})}.items():
        if value:
            lines.append(f"  {key}: {value}")
    lines.append(f"  folder: {folder}")
    return lines


NO_JOBS = (
    "no jobs yet: run `sdcluster launch` (the tiny demo, on this machine, in minutes) or "
    "`sdcluster launch +cluster=slurm ...` on a cluster; `sdcluster launch --help` lists every option"
)


def list_recent(jobs_root: Path, limit: int = 20) -> list[str]:
    """The user's jobs at a glance, newest first (those under ``jobs_root`` and in the index), then their
    sweeps; what to do when there is none."""
    from sdcluster import status
    from sdcluster.sweep.ledger import user_sweeps
    from sdcluster.sweep.report import list_sweeps

    jobs = status.recent(jobs_root, limit)
    if not jobs:
        return [NO_JOBS]
    lines = ["jobs, newest first (`sdcluster logs ID`: one job's attempts and log):"]
    lines += status.format_jobs(jobs)
    sweeps = user_sweeps(jobs_root=jobs_root)
    if sweeps:
        lines += ["", "sweeps (`sdcluster sweep report ID`: table, CSV and loss plot):", *list_sweeps(sweeps)]
    return lines


def _array_listing(job_id: str, tasks: dict[str, Path], ask: bool) -> list[str]:
    lines = [f"job array {job_id}: {len(tasks)} tasks (show one with: sdcluster logs {job_id}_<k>)"]
    for task_id, folder in tasks.items():
        record = records.read(folder)
        sched = _scheduler_state(record, task_id, ask)
        state = sched[0] if sched else records.recorded_state(record)
        lines.append(f"  {task_id:<14} {record.get('task', '?'):<9} {state}")
    return lines


def _described(found: records.Found) -> str:
    where = (
        f"cluster {found.cluster}" if found.cluster else "an unknown cluster (indexed before clusters were)"
    )
    first = next(iter(found.folders.values()))
    if len(found.folders) == 1:
        what = f"{records.read(first).get('task', '?')} job"
    else:
        what = f"job array of {len(found.folders)} tasks"
    return f"{where}: {what}, {first}"


def _fix(job_id: str, found: records.Found, prog: str) -> str:
    """The command that shows this one: by its cluster, or (a line without one) by its jobs root."""
    if found.cluster:
        return f"{prog} --cluster {found.cluster} {job_id}"
    return f"{prog} --jobs-root {next(iter(found.folders.values())).parent} {job_id}"


def choose(
    job_id: str, found: list[records.Found], cluster: str | None, prog: str
) -> tuple[records.Found | None, str]:
    """The place the user means by ``job_id``, and a note on the others (or, without one, why not).

    ``cluster`` (``--cluster``) decides; else the jobs root asked for (the working directory's ``jobs/``),
    else the only place, else the only one on a cluster this machine reaches. Job ids are unique within one
    cluster only, and a home directory (with its index) is often shared between clusters.
    """
    if cluster is not None:
        found = [f for f in found if f.cluster == cluster]
        if not found:
            return (
                None,
                f"{prog}: no job {job_id} on cluster {cluster}. Run `{prog} {job_id}` to see where it is.",
            )
    chosen = found[0] if found[0].here or len(found) == 1 else None
    if chosen is None:
        here = backends.clusters_here()
        reachable = [f for f in found if f.cluster in here]
        chosen = reachable[0] if len(reachable) == 1 else None
    others = [f for f in found if f is not chosen]
    if chosen is None:
        lines = [f"{prog}: job {job_id} is known on {len(found)} clusters; choose one with --cluster NAME:"]
        lines += [f"  {_described(f)}\n    {_fix(job_id, f, prog)}" for f in found]
        return None, "\n".join(lines)
    notes = [f"(job {job_id} is also known on {_described(f)}: {_fix(job_id, f, prog)})" for f in others]
    return chosen, "\n".join(notes)


def show(job_id: str, found: records.Found, task: int, err: bool, follow: bool) -> None:
    """One job's (or a job array's) story and log; the scheduler is asked only when it is the job's own."""
    ask = found.cluster is None or found.cluster in backends.clusters_here()
    tasks = [t for t in found.folders if t != job_id]
    if tasks:  # a job array's id: its tasks, then the first one
        print("\n".join(_array_listing(job_id, {t: found.folders[t] for t in tasks}, ask)))
        job_id = tasks[0]
    folder = found.folders[job_id]
    print("\n".join(summary(job_id, folder, task, ask)))
    path = paths.job_log(folder, job_id, task, err)
    print(f"---- {path}")
    if follow:
        record = records.read(folder)
        records.follow(path, job_id, folder, lambda job: _scheduler_state(record, job, ask))
    elif path.is_file():
        print(path.read_text(errors="replace"), end="")
    else:
        print("(no log yet: the job has not started)")


def main(argv: list[str] | None = None, prog: str = "python -m sdcluster.logs") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("job_id", nargs="?", help="e.g. 5256095, or 5256095_3 for one task of an array")
    parser.add_argument("--task", type=int, default=0, help="rank (task of the job) whose log to show")
    parser.add_argument("--err", action="store_true", help="show stderr instead of stdout")
    parser.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    parser.add_argument("--jobs-root", type=Path, default=Path("jobs"))
    parser.add_argument(
        "--cluster", help="the cluster (SLURM's ClusterName) of the job, when its id is known on several"
    )
    args = parser.parse_args(argv)
    if not args.job_id:
        print("\n".join(list_recent(args.jobs_root)))
        return 0
    found = records.locate(args.job_id, args.jobs_root)
    if not found:
        print(
            f"{prog}: no job {args.job_id} under {args.jobs_root.resolve()} "
            f"or in {paths.job_index()}. "
            f"Run `{prog}` to list known jobs.",
            file=sys.stderr,
        )
        return 2
    chosen, message = choose(args.job_id, found, args.cluster, prog)
    if chosen is None:
        print(message, file=sys.stderr)
        return 2
    if message:
        print(message)
    show(args.job_id, chosen, args.task, args.err, args.follow)
    return 0


if __name__ == "__main__":
    sys.exit(main())
