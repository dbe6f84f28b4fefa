"""What SLURM knows, asked through its own commands: a job's state (sacct, else squeue) and the partitions.

Every call has a time-out and returns None (or raises :class:`SchedulerUnavailable`) instead of hanging when
the controller is down: the login-node commands must answer even then.
"""

from __future__ import annotations

import shutil
import subprocess

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
CLIENTS = ("sbatch", "sinfo", "squeue")
# States in which a job may still write: queued, running, being requeued or held.
LIVE = (
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "STAGE_OUT",
    "SIGNALING",
)


class SchedulerUnavailable(RuntimeError):
    """No SLURM client on PATH, or the controller does not answer; the message says which."""


def _run(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def _records(job_id: str) -> list[tuple[str, str]]:
    """(state, exit code) of every task of a job (an array has several) from sacct, else (state, '') from
    squeue; [] if neither answered (no SLURM, or no accounting and the job left the queue)."""
    commands = (
        ["sacct", "-j", job_id, "-n", "-X", "-P", "-o", "State,ExitCode"],
        ["squeue", "-h", "-j", job_id, "-o", "%T"],
    )
    for cmd in commands:
        try:
            out = _run(cmd, timeout=20)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue
        lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
        if out.returncode == 0 and lines:
            return [(state.split()[0], code) for state, _, code in (ln.partition("|") for ln in lines)]
    return []


def job_state(job_id: str) -> tuple[str, str] | None:
    """(state, exit code) of a job (its last task), or None when SLURM knows nothing of it."""
    found = _records(job_id)
    return found[-1] if found else None


def job_states(job_id: str) -> list[str] | None:
    """The state of every task of a job, or None when SLURM knows nothing of it."""
    return [state for state, _ in _records(job_id)] or None


def partitions() -> list[str]:
    """The cluster's partition names (sinfo); raises :class:`SchedulerUnavailable` with the reason."""
    for tool in CLIENTS:
        if shutil.which(tool) is None:
            raise SchedulerUnavailable(f"`{tool}` is not on PATH")
    try:
        out = _run(["sinfo", "-h", "-o", "%P"])
    except subprocess.TimeoutExpired:
        raise SchedulerUnavailable(
            "the SLURM controller did not answer (sinfo: no answer within 30 s)"
        ) from None
    if out.returncode != 0:
        raise SchedulerUnavailable(f"the SLURM controller did not answer (sinfo: {out.stderr.strip()})")
    return [p.strip().rstrip("*") for p in out.stdout.split()]
