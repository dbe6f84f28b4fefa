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


def job_state(job_id: str) -> tuple[str, str] | None:
    """(state, exit code) from sacct, else (state, '') from squeue, else None (not a SLURM job / no SLURM)."""
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
            state, _, code = lines[-1].partition("|")
            return state.split()[0], code
    return None


def job_states(job_id: str) -> list[str] | None:
    """The state of every task of a job (an array has several), from sacct, else squeue; None if neither
    answered (no SLURM, or no accounting and the job left the queue)."""
    commands = (
        ["sacct", "-j", job_id, "-n", "-X", "-P", "-o", "State"],
        ["squeue", "-h", "-j", job_id, "-o", "%T"],
    )
    for cmd in commands:
        try:
            out = _run(cmd, timeout=20)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue
        states = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
        if out.returncode == 0 and states:
            return states
    return None


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
