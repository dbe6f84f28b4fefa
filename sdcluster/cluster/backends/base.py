"""The protocol every cluster backend implements, and the words both sides share.

A backend is what differs between schedulers, in the style of submitit's executor plugins: how a job is
submitted (an executor, arrays, dependencies), what the scheduler says of it, which checks come before
queueing, and, inside the job, what the scheduler's environment says (attempt, array task, rank, CPUs) and
which signals stop it. Everything above asks a backend and never names one.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import submitit

    from sdcluster.config import Config

# The job-state words are SLURM's; the records use the same (``records.TERMINAL``: no more writes). In
# LIVE a job may still write: queued, running, being requeued or held.
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


@dataclass(frozen=True)
class BoundGpus:
    """The GPUs the scheduler bound to one task, as it set them for the task (before anything in the process
    rewrote them: submitit's distributed helper, for one, sets ``CUDA_VISIBLE_DEVICES`` to the local rank)."""

    visible: tuple[str, ...]  # what the task may use, as CUDA_VISIBLE_DEVICES names them, in order
    on_node: int | None  # the step's GPUs on this node: more than ``visible`` when each task has its own
    local_id: int  # the task's index among the tasks of its node
    tasks_on_node: int  # the tasks of the step on this node


@dataclass(frozen=True)
class JobEnvironment:
    """What the scheduler tells a process of a job (read on the compute node); defaults outside a job."""

    inside: bool = False  # this process runs under the backend's scheduler
    restart_count: int = 0  # 0 on the first attempt, n after n requeues
    array_task: str | None = None  # the task's index in its array, as the scheduler spells it
    rank: int = 0  # the process's global rank, known before torch's rendezvous
    cpus_per_task: int | None = None  # the CPUs the scheduler gave each task, when it says
    gpus: BoundGpus | None = None  # the GPUs bound to this task; None when the scheduler bound none


@dataclass(frozen=True)
class TaskFailure:
    """Which task of a job's work failed first, and how, as the scheduler's launcher said it (every field
    None where it did not say: a node that died may take the launcher's words with it)."""

    node: str | None = None  # the node the task ran on
    rank: int | None = None  # the task's global rank
    how: str | None = None  # the launcher's words: "Killed", "Exited with exit code 3"


class Backend(Protocol):
    """One scheduler (or none): the login side submits and asks through it, the job reads its environment."""

    name: str  # the value of ``cluster.name`` that selects it (and the option ``conf/cluster/<name>.yaml``)
    title: str  # how messages name its scheduler: "a SLURM setting", "a SLURM login node"
    foreground: bool  # jobs are processes of the launching machine: run one at a time, waited for, Ctrl-C
    requeues: bool  # a preempted or timed-out job is requeued in place (else it stops and says how to resume)
    resume_hint: str  # what a user does to resume a job that stopped early
    stop_signals: tuple[signal.Signals, ...]  # signals that ask the job to stop at a step with a checkpoint

    def executor(self, cfg: Config, folder: Path, name: str, after: str | None) -> submitit.Executor:
        """A submitit executor for one job (or array) named ``name``, waiting on job ``after`` when given."""
        ...

    def script(self, cfg: Config, folder: Path, name: str, after: str | None, array_size: int | None) -> str:
        """The exact script the scheduler would get for that job (or a line saying there is none), made
        without submitting or writing anything: for the dry run and the checks."""
        ...

    def check_script(self, kind: str, script: str) -> None:
        """Refuse (``ConfigError``) a rendered job script that would not run as meant."""
        ...

    def own_keys(self) -> tuple[str, ...]:
        """The ``cluster.*`` keys only this backend reads: set without choosing it, they would be ignored."""
        ...

    def login_node(self, environ: Mapping[str, str]) -> str | None:
        """Why this machine looks like a login node of this scheduler (and not inside one of its jobs), or
        None: a job heavier than the demo then needs an explicit choice to run here."""
        ...

    def check_config(self, cfg: Config) -> None:
        """Refuse (``ConfigError``) what this backend cannot run, from the config alone (no scheduler query):
        preflight asks it right after the schema's cross-group checks, before staging or queries."""
        ...

    def check(self, cfg: Config, dry_run: bool) -> list[str]:
        """The scheduler-side checks before queueing; returns what a dry run could not check."""
        ...

    def job_state(self, job_id: str) -> tuple[str, str] | None:
        """(state, exit code) of a job (its last task), or None when the scheduler knows nothing of it."""
        ...

    def job_states(self, job_id: str) -> list[str] | None:
        """The state of every task of a job, or None when the scheduler knows nothing of it."""
        ...

    def view(self, job_ids: list[str]) -> dict[str, tuple[str, str]]:
        """``{job_id: (state, node list)}`` for many jobs in one query; {} when the scheduler cannot say."""
        ...

    def stop_hint(self, job_id: str) -> str:
        """How a user stops a running job."""
        ...

    def cluster_name(self) -> str | None:
        """The name of the cluster this machine submits to (job ids are unique only within it), or None
        when no scheduler answers. Recorded with each id in the user's job index, whose home directory
        may be shared between clusters."""
        ...

    def preemption(self) -> str | None:
        """Inside a job that got a stop signal: None when the scheduler is not preempting it (a person
        cancelled it), else what the site does with a preempted job, in SLURM's words: ``REQUEUE`` (it
        comes back), ``CANCEL`` (it ends), or "" when the scheduler does not say."""
        ...

    def job_environment(self) -> JobEnvironment:
        """What this process's environment says of the job it runs in."""
        ...

    def end_time(self) -> float | None:
        """Inside a job: when the scheduler will end it (its time limit, in seconds since the epoch), or
        None when it has no limit or cannot say. Asked once per attempt: a requeued job has a new one."""
        ...

    def after_failure(self, log_text: str) -> TaskFailure | None:
        """Inside a job whose work just ended with a non-zero status: which task failed first and where
        (read from the launcher's lines in ``log_text``, the job script's stderr since the last failure),
        or None when the scheduler itself is ending the job (a cancel, the time limit, a preemption, a
        requeue already asked for): that is no failure to retry."""
        ...

    def requeue(self) -> None:
        """Inside a job: put it back in the queue under the same id (it starts again from the top and
        resumes from its run folder). Raises ``RuntimeError`` with the scheduler's answer if refused."""
        ...

    def cancel(self) -> None:
        """Inside a job: end it as cancelled, so that the scheduler's accounting says so (a job that left on
        its own would read COMPLETED or FAILED). Raises ``RuntimeError`` with the scheduler's answer if
        refused."""
        ...
