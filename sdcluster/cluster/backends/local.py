"""No scheduler: jobs are subprocesses of the launcher on this machine (submitit's ``LocalExecutor``).

There is no queue to hold a dependency or an array, so the launcher runs the jobs one after another and
waits for each; a person at the terminal stops a job with Ctrl-C (or SIGTERM), and the same command resumes.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import submitit

from sdcluster.cluster.backends.base import JobEnvironment, TaskFailure

if TYPE_CHECKING:
    from sdcluster.config import Config


class LocalBackend:
    name = "local"
    title = "local"
    foreground = True
    requeues = False
    resume_hint = "rerun the same command to resume"
    stop_signals = (signal.SIGINT, signal.SIGTERM)  # a person stopping a job (submitit ignores SIGTERM)

    def executor(self, cfg: Config, folder: Path, name: str, after: str | None) -> submitit.Executor:
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=cfg.cluster.timeout_min, nodes=1, tasks_per_node=1)
        return executor

    def script(self, cfg: Config, folder: Path, name: str, after: str | None, array_size: int | None) -> str:
        return "# local executor: no sbatch script; the job runs in a subprocess on this machine\n"

    def check_script(self, kind: str, script: str) -> None:
        return None  # nothing is rendered: the job is a plain subprocess

    def own_keys(self) -> tuple[str, ...]:
        return ()  # timeout_min and gpus_per_node, which schedulers read too

    def login_node(self, environ: Mapping[str, str]) -> str | None:
        return None  # any machine runs local jobs

    def check_config(self, cfg: Config) -> None:
        # imported when asked, as the SLURM backend's checks: the job imports this module for its environment
        from sdcluster.config.checks import ConfigError
        from sdcluster.config.cluster import job_key

        for kind, job in cfg.cluster.jobs(cfg.task).items():  # the executor above is given one task
            if job.world_size > 1:
                raise ConfigError(
                    f"{job_key(kind, 'tasks_per_node')}/nodes: the local executor runs one process, got "
                    f"world size {job.world_size} for the {kind} job. Fix: use +cluster=slurm for several "
                    "processes"
                )

    def check(self, cfg: Config, dry_run: bool) -> list[str]:
        return []

    def job_state(self, job_id: str) -> tuple[str, str] | None:
        return None  # no scheduler: the job's own record is all there is

    def job_states(self, job_id: str) -> list[str] | None:
        return None

    def view(self, job_ids: list[str]) -> dict[str, tuple[str, str]]:
        return {}

    def stop_hint(self, job_id: str) -> str:
        return "Ctrl-C in its terminal"

    def preemption(self) -> str | None:
        return None  # no scheduler: a stop signal comes from a person

    def job_environment(self) -> JobEnvironment:
        return JobEnvironment()  # one task, never requeued, no array

    def end_time(self) -> float | None:
        return None  # no scheduler: submitit's local controller warns before its own timeout; no requeue

    def after_failure(self, log_text: str) -> TaskFailure | None:
        return None  # never asked: a local job fails in front of the person who launched it

    def requeue(self) -> None:
        raise RuntimeError("a local job has no queue to go back to: rerun the same command to resume")

    def cancel(self) -> None:
        return None  # never asked: only a preempted job is cancelled by its own hand

    def cluster_name(self) -> str:
        return f"local@{socket.gethostname()}"  # a local job's id is a process id of this machine
