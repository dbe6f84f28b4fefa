"""A job whose work failed (a rank that died, a node that failed, an error in the job) comes back within
``cluster.max_failures``, unless the failure repeats at the step where the previous one happened.

Run by the job script itself once its work has ended, not by the job's processes: when one rank dies the
scheduler's launcher ends the others without a word (SLURM's srun with ``--kill-on-bad-exit``: SIGTERM,
then SIGKILL), so no handler inside them can be relied on. The backend installs the call (for SLURM a bash
EXIT trap before srun, :func:`sdcluster.cluster.backends.slurm.failure_trap`) with the work's exit status::

    python -m sdcluster.runtime.failures --backend NAME --folder JOBS/%j --max-failures 2 --status 137

A zero status, an attempt the job ended itself (completed, or saved and requeued at a time-out or a
preemption) and whatever the scheduler is ending itself (a cancel, the time limit, a preemption: the
backend's ``after_failure`` says None) are left alone. Else the attempt is recorded FAILED with where it
happened (node, rank, step) and the job is requeued through its backend: it starts again from the top
and resumes from the newest complete checkpoint, as any requeued job does.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import submitit

from sdcluster import atomic, paths
from sdcluster.cluster import backends, records
from sdcluster.cluster.backends.base import Backend, TaskFailure

# What this module prints to the job's stderr for each failure it handled: the launcher's lines of an
# earlier attempt (the log is appended to across requeues) come before the last such line.
_REPORTED = re.compile(r"^sdcluster: attempt \d+ failed: .*$", re.M)
# Ended by the job itself: nothing failed, or it saved and asked for its requeue already.
_ENDED_BY_THE_JOB = ("COMPLETED", "PREEMPTED", "TIMEOUT")


def since_last_report(log_text: str) -> str:
    """The part of the job script's stderr written since the last failure this module reported."""
    reported = list(_REPORTED.finditer(log_text))
    return log_text[reported[-1].end() :] if reported else log_text


def _started(attempt: dict[str, Any]) -> float | None:
    try:
        return datetime.strptime(attempt["started"], "%Y-%m-%dT%H:%M:%S%z").timestamp()
    except (KeyError, TypeError, ValueError):
        return None


def reached_step(record: dict[str, Any], attempt: dict[str, Any] | None) -> int | None:
    """The step the failed attempt had reached: the one it recorded, else the newest training step it
    logged (metrics.jsonl lines of this attempt: the file holds every attempt's); None when unknown (a
    generation job, or a failure before the first logged step)."""
    if attempt is None:
        return None
    if attempt.get("step") is not None:
        return int(attempt["step"])
    started = _started(attempt)
    if started is None or not record.get("run_dir"):
        return None
    lines = atomic.read_jsonl(paths.RunPaths(Path(record["run_dir"])).metrics)
    # records.now() keeps whole seconds: a line of the attempt's first second is the attempt's
    steps = [ln["step"] for ln in lines if isinstance(ln.get("step"), int) and ln.get("time", 0) >= started]
    return steps[-1] if steps else None


def decide(earlier: list[dict[str, Any]], step: int | None, max_failures: int) -> tuple[bool, str]:
    """Whether a failure at ``step`` is requeued, after the job's ``earlier`` attempts, and why (or why
    not). A failure at the step of the previous failure is a bug or bad data, not the machine: retrying it
    would only repeat it. An unknown step repeats nothing: only the budget bounds those."""
    failed = [a for a in earlier if a.get("state") == "FAILED"]
    used = sum(1 for a in failed if a.get("requeued"))
    fix = "fix the cause (the log says it), then run the same command to resume"
    if failed and step is not None and failed[-1].get("step") == step:
        why = f"the previous attempt failed at step {step} too (a bug or bad data?)"
        return False, f"not requeued: {why}; {fix}"
    if used >= max_failures:
        return False, f"not requeued (cluster.max_failures={max_failures}, used {used}); {fix}"
    return True, f"requeued ({used + 1} of cluster.max_failures={max_failures})"


def _where(failure: TaskFailure, status: int, step: int | None) -> str:
    how = failure.how or f"the work ended with exit status {status}"
    task = f"rank {failure.rank}" if failure.rank is not None else "a task"
    node = f" on node {failure.node}" if failure.node else ""
    return f"{how} ({task}{node}) at step {'?' if step is None else step}"


def handle(folder: Path, backend: Backend, status: int, max_failures: int, log_text: str) -> bool:
    """Record a failed attempt of the job in ``folder`` and requeue it within budget; True if requeued."""
    record = records.read(folder)
    attempts: list[dict[str, Any]] = record.get("attempts", [])
    restart = backends.environment().restart_count
    # the attempt rank 0 opened in this run of the job, if it got that far
    current = attempts[-1] if attempts and attempts[-1].get("restart_count", 0) == restart else None
    ended_itself = current and (current.get("requeued") or current.get("state") in _ENDED_BY_THE_JOB)
    if status == 0 or not record or ended_itself:
        return False
    failure = backend.after_failure(since_last_report(log_text))
    if failure is None:  # the scheduler is ending the job itself: its own state says what happened
        return False
    if current is None:  # it failed before rank 0 recorded its start
        current = {"restart_count": restart, "host": socket.gethostname(), "started": None}
        attempts.append(current)
    step = reached_step(record, current)
    requeue, decision = decide(attempts[:-1], step, max_failures)
    reason = f"{_where(failure, status, step)}; {decision}"
    if current.get("exit_reason"):  # what rank 0 caught (a peer's death breaks its collectives too)
        current["error"] = current["exit_reason"]
    current.update(
        ended=current.get("ended") or records.now(),
        state="FAILED",
        step=step,
        exit_reason=reason,
        requeued=requeue,
        failed_node=failure.node,
        failed_rank=failure.rank,
    )
    records.update(folder, {"attempts": attempts, "state": "FAILED", "step": step, "exit_reason": reason})
    print(f"sdcluster: attempt {len(attempts)} failed: {reason}", file=sys.stderr, flush=True)
    if requeue:
        backend.requeue()  # last: the scheduler may end this shell as it takes the job back
    return requeue


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdcluster.runtime.failures", description=__doc__)
    parser.add_argument("--backend", required=True, help="the cluster.name of the job")
    parser.add_argument("--folder", required=True, help="the jobs folder pattern, %%j for the job id")
    parser.add_argument("--max-failures", type=int, required=True)
    parser.add_argument("--status", type=int, required=True, help="the exit status of the job's work")
    args = parser.parse_args(argv)
    if args.status == 0:
        return 0
    try:
        job_id = submitit.JobEnvironment().job_id  # "<array>_<task>" for an array task, as its folder
        folder = Path(args.folder.replace("%j", job_id))
        log = paths.job_log(folder, job_id, 0, err=True)  # the job script's stderr, where the launcher writes
        text = log.read_text(errors="replace") if log.is_file() else ""
        handle(folder, backends.get(args.backend), args.status, args.max_failures, text)
    except Exception as err:  # the job's own exit status stands; say why nothing was decided
        print(f"sdcluster: could not handle the failure ({err!r}); not requeued", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
