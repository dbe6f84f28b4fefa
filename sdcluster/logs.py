"""Read a job's story by its id: ``python -m sdcluster.logs 5256095 [--follow] [--task N] [--err]``.

Prints the scheduler's state and exit code (``sacct``, falling back to ``squeue``), the attempts recorded in
``job.json`` (requeues and their reasons), the last progress line, where the outputs are, and the log itself.
Without an id it lists recent jobs. Works from any directory: submissions are indexed in
``~/.sdcluster/jobs.tsv`` (override with ``SDCLUSTER_HOME``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from sdcluster import ledger, metrics
from sdcluster.paths import RunPaths

_TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED")
_PROGRESS = re.compile(r"(step \d+/\d+ \|.*)$")


def index_file() -> Path:
    return Path(os.environ.get("SDCLUSTER_HOME", Path.home() / ".sdcluster")) / "jobs.tsv"


def index_job(job_id: str, folder: Path) -> None:
    """Remember where a job's folder is, so ``logs <id>`` works from any directory."""
    path = index_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(f"{job_id}\t{folder.resolve()}\n")


def find_job(job_id: str, jobs_root: Path) -> Path | None:
    local = jobs_root / job_id
    if (local / ledger.JOB_JSON).is_file():
        return local
    if index_file().is_file():
        for line in reversed(index_file().read_text().splitlines()):
            jid, _, folder = line.partition("\t")
            if jid == job_id and Path(folder).is_dir():
                return Path(folder)
    return None


def log_file(folder: Path, job_id: str, task: int, err: bool) -> Path:
    return folder / f"{job_id}_{task}_log.{'err' if err else 'out'}"


def scheduler_state(job_id: str) -> tuple[str, str] | None:
    """(state, exit code) from sacct, else (state, '') from squeue, else None (not a SLURM job / no SLURM)."""
    commands = (
        ["sacct", "-j", job_id, "-n", "-X", "-P", "-o", "State,ExitCode"],
        ["squeue", "-h", "-j", job_id, "-o", "%T"],
    )
    for cmd in commands:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue
        lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
        if out.returncode == 0 and lines:
            state, _, code = lines[-1].partition("|")
            return state.split()[0], code
    return None


def last_progress(path: Path) -> str | None:
    if not path.is_file():
        return None
    found = None
    for line in path.read_text(errors="replace").splitlines():
        match = _PROGRESS.search(line)
        if match:
            found = match.group(1)
    return found


def summary(job_id: str, folder: Path, task: int = 0) -> list[str]:
    record = ledger.read(folder)
    lines = [f"job {job_id}: {record.get('task', '?')} on {record.get('cluster', '?')}"]
    sched = scheduler_state(job_id) if record.get("cluster") == "slurm" else None
    if sched:
        lines.append(f"  scheduler state: {sched[0]}" + (f" (exit code {sched[1]})" if sched[1] else ""))
    lines.append(f"  recorded state:  {record.get('state', '?')}")
    for i, attempt in enumerate(record.get("attempts", []), 1):
        details = ", ".join(
            f"{k} {attempt[k]}" for k in ("state", "step", "exit_reason", "requeued") if k in attempt
        )
        lines.append(f"  attempt {i} (restart {attempt.get('restart_count', 0)}): {details}")
    progress = last_progress(log_file(folder, job_id, task, err=False))
    if progress:
        lines.append(f"  last progress:   {progress}")
    if record.get("run_dir"):
        _, val = metrics.read(RunPaths(Path(record["run_dir"])).metrics)
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


def follow(path: Path, job_id: str, folder: Path, poll_s: float = 2.0) -> None:
    """Print new log lines until the job reaches a terminal state."""
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
        state = sched[0] if sched else ledger.read(folder).get("state", "")
        if state in _TERMINAL:
            return
        time.sleep(poll_s)


def list_recent(jobs_root: Path, limit: int = 20) -> list[str]:
    rows = [f"{'job':<14} {'task':<9} {'state':<11} {'submitted':<25} run"]
    for job_id, record in ledger.list_jobs(jobs_root)[:limit]:
        rows.append(
            f"{job_id:<14} {record.get('task', '?'):<9} {record.get('state', '?'):<11} "
            f"{record.get('submitted', '?'):<25} {record.get('run_dir', '')}"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdcluster.logs", description=__doc__.splitlines()[0])
    parser.add_argument("job_id", nargs="?", help="e.g. 5256095 or 5256095_3 for an array task")
    parser.add_argument("--task", type=int, default=0, help="rank (SLURM task) whose log to show")
    parser.add_argument("--err", action="store_true", help="show stderr instead of stdout")
    parser.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    parser.add_argument("--jobs-root", type=Path, default=Path("jobs"))
    args = parser.parse_args(argv)
    if not args.job_id:
        print("\n".join(list_recent(args.jobs_root)))
        return 0
    folder = find_job(args.job_id, args.jobs_root)
    if folder is None:
        print(
            f"sdcluster.logs: no job {args.job_id} under {args.jobs_root.resolve()} or in {index_file()}. "
            "Run `python -m sdcluster.logs` to list known jobs.",
            file=sys.stderr,
        )
        return 2
    print("\n".join(summary(args.job_id, folder, args.task)))
    path = log_file(folder, args.job_id, args.task, args.err)
    print(f"---- {path}")
    if args.follow:
        follow(path, args.job_id, folder)
    elif path.is_file():
        print(path.read_text(errors="replace"), end="")
    else:
        print("(no log yet: the job has not started)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
