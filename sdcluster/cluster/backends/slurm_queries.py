"""What SLURM knows (the SLURM backend's queries), asked through its own commands: a job's state (sacct,
else squeue), end time (squeue) and live fields (scontrol), the partitions and their limits (scontrol,
sinfo); and what a job asks of it: a requeue (scontrol), a cancel (scancel), with srun's word on a failed
task (how a preemption ends a job: :mod:`.slurm_preemption`).

Every call has a time-out and returns None (or raises :class:`SchedulerUnavailable`) instead of hanging when
the controller is down: the login-node commands must answer even then.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

CLIENTS = ("sbatch", "sinfo", "squeue")


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


def end_time(job_id: str) -> float | None:
    """When SLURM will end job ``job_id`` (its time limit, seconds since the epoch), or None when it has none
    or SLURM does not answer.

    ``SLURM_JOB_END_TIME`` says it without a query where SLURM sets it (23.02 and later); else squeue's
    ``%e``, printed as epoch seconds (``SLURM_TIME_FORMAT=%s``) so that no time zone is parsed.
    """
    given = os.environ.get("SLURM_JOB_END_TIME", "")
    if given.isdigit():
        return float(given)
    env = {**os.environ, "SLURM_TIME_FORMAT": "%s"}
    try:
        out = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%e"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
            env=env,
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    answer = out.stdout.strip()
    # "Unknown" or "NONE" with no time limit; only a plain number is an end time
    return float(answer) if out.returncode == 0 and answer.isdigit() else None


def job_fields(job_id: str) -> dict[str, str]:
    """``scontrol show job``'s ``Key=Value`` fields of a job (JobState, PreemptTime...); {} when SLURM does
    not answer. scontrol, not sacct: it is the controller's view of this moment, accounting lags it."""
    try:
        out = _run(["scontrol", "show", "job", job_id, "--oneliner"], timeout=20)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return {}
    return dict(field.partition("=")[::2] for field in out.stdout.split()) if out.returncode == 0 else {}


def requeue(job_id: str) -> None:
    """``scontrol requeue``: the job goes back to PENDING under its id (it must be requeueable: the
    cluster's JobRequeue=1 or sbatch --requeue; submitit's own requeue asks the same)."""
    try:
        out = _run(["scontrol", "requeue", job_id], timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"scontrol requeue {job_id} did not answer ({err})") from None
    if out.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job_id} refused: {out.stderr.strip() or out.stdout.strip()}")


def cancel(job_id: str) -> None:
    """``scancel``: the job ends CANCELLED (its steps get SIGTERM, then SIGKILL after KillWait)."""
    try:
        out = _run(["scancel", job_id], timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"scancel {job_id} did not answer ({err})") from None
    if out.returncode != 0:
        raise RuntimeError(f"scancel {job_id} refused: {out.stderr.strip() or out.stdout.strip()}")


# srun's line for a task that ended badly: "srun: error: node3: task 1: Killed", or "tasks 0-3: Exited
# with exit code 2" for several at once. The first one is the task that failed: with --kill-on-bad-exit
# srun kills the others after it, and their lines follow.
_TASK_ERROR = re.compile(r"^srun: error: (?P<node>[^:\s]+): tasks? (?P<rank>\d+)[-,\d]*: (?P<how>.+)$", re.M)


def failed_task(log_text: str) -> tuple[str, int, str] | None:
    """(node, rank, how) of the first task srun reported as failed in ``log_text``, or None."""
    found = _TASK_ERROR.search(log_text)
    return (found["node"], int(found["rank"]), found["how"].strip()) if found else None


def cluster_name() -> str | None:
    """The ``ClusterName`` of the cluster the SLURM clients here talk to, or None when none answers.

    Asked once per process and config: ``sdcluster logs`` asks for every job it lists, and the answer
    changes only with ``SLURM_CONF`` (a test, or a user, may point one process at two clusters in turn).
    """
    return _cluster_name(os.environ.get("SLURM_CONF"))


@functools.lru_cache(maxsize=8)
def _cluster_name(slurm_conf: str | None) -> str | None:
    # The controller's view, not a slurm.conf read here: a configless login node has no file to read.
    if slurm_conf and not os.path.isfile(slurm_conf):
        return None  # the clients would look for a controller in DNS for about a minute, then fail
    try:
        out = _run(["scontrol", "show", "config"], timeout=20)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"^ClusterName\s*=\s*(\S+)", out.stdout, re.MULTILINE)
    return found.group(1) if out.returncode == 0 and found else None


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


@dataclass(frozen=True)
class NodeSize:
    """What one node of a partition has (``sinfo -N``): the most a job may ask for per node."""

    name: str
    cpus: int
    memory_mb: int
    gpus: int


@dataclass(frozen=True)
class Partition:
    """A partition's limits as ``scontrol show partition`` says them; None where it sets none (UNLIMITED)."""

    name: str
    total_nodes: int
    max_nodes: int | None
    max_time_s: int | None
    max_mem_per_node_mb: int | None
    max_mem_per_cpu_mb: int | None
    nodes: tuple[NodeSize, ...]


_UNLIMITED = ("UNLIMITED", "INFINITE", "NONE", "N/A")


def _number(text: str | None) -> int | None:
    """An integer field of scontrol's output; None when unset or unlimited."""
    if text is None or text.upper() in _UNLIMITED:
        return None
    return int(text)


def parse_seconds(text: str | None) -> int | None:
    """A SLURM duration (``MaxTime``) in seconds: ``[days-]hours:minutes:seconds``, ``days-hours``,
    ``minutes:seconds`` or minutes; None when unlimited."""
    if text is None or text.upper() in _UNLIMITED:
        return None
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if days:  # days-hours[:minutes[:seconds]]
        hours, minutes, seconds = [*parts, 0, 0][:3]
    else:
        hours, minutes, seconds = {1: (0, parts[0], 0), 2: (0, *parts), 3: tuple(parts)}[len(parts)]
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def parse_gpus(gres: str) -> int:
    """GPUs in a node's ``Gres`` (``gpu:4``, ``gpu:a100:2(S:0-1),gpu:v100:2``, ``(null)``): the sum of its
    ``gpu`` entries; a ``gpu`` entry without a count is one."""
    total = 0
    for entry in re.sub(r"\([^)]*\)", "", gres).split(","):  # socket bindings can hold commas
        name, *rest = entry.strip().split(":")
        if name == "gpu":
            total += int(rest[-1]) if rest and rest[-1].isdigit() else 1
    return total


def parse_partitions(text: str) -> dict[str, dict[str, str]]:
    """``scontrol -o show partition``: one line per partition of ``Key=Value`` fields, by name."""
    found = {}
    for line in text.splitlines():
        fields = dict(f.partition("=")[::2] for f in line.split() if "=" in f)
        if "PartitionName" in fields:
            found[fields["PartitionName"]] = fields
    return found


def _ask(args: list[str]) -> str:
    try:
        out = _run(args)
    except (FileNotFoundError, subprocess.TimeoutExpired) as err:
        raise SchedulerUnavailable(f"`{' '.join(args)}` did not answer ({err})") from None
    if out.returncode != 0:
        raise SchedulerUnavailable(f"`{' '.join(args)}` failed: {out.stderr.strip()}")
    return out.stdout


def partition(name: str | None) -> Partition | None:
    """The limits of partition ``name`` (None: the default one) and the sizes of its nodes, or None when the
    cluster has no such partition (or no default). Raises :class:`SchedulerUnavailable` when SLURM does not
    answer."""
    fields = parse_partitions(_ask(["scontrol", "-o", "show", "partition"]))
    if name is None:
        name = next((n for n, f in fields.items() if f.get("Default") == "YES"), None)
    if name not in fields:
        return None
    listing = _ask(["sinfo", "-h", "-N", "-p", name, "-o", "%N|%c|%m|%G"])
    try:
        return _limits(name, fields[name], listing)
    except ValueError as err:  # a field in a shape this reader does not know: say so, do not guess
        raise SchedulerUnavailable(f"could not read partition {name!r}'s limits ({err})") from None


def _limits(name: str, part: dict[str, str], listing: str) -> Partition:
    nodes = {}  # by name: a node listed twice is one node
    for line in listing.splitlines():
        node, cpus, memory, gres = line.strip().split("|")
        nodes[node] = NodeSize(node, int(cpus.rstrip("+")), int(memory.rstrip("+")), parse_gpus(gres))
    return Partition(
        name=name,
        total_nodes=int(part.get("TotalNodes", len(nodes))),
        max_nodes=_number(part.get("MaxNodes")),
        max_time_s=parse_seconds(part.get("MaxTime")),
        max_mem_per_node_mb=_number(part.get("MaxMemPerNode")),
        max_mem_per_cpu_mb=_number(part.get("MaxMemPerCPU")),
        nodes=tuple(nodes.values()),
    )
