"""SLURM through submitit's ``SlurmExecutor``: arrays, ``afterok`` dependencies, requeue on preemption.

Queries go to SLURM's own commands (:mod:`.slurm_queries`), the checks before queueing are in
:mod:`.slurm_checks`, and inside a job SLURM's environment (``SLURM_*``) says the attempt, array task, rank
and CPUs. Cluster facts come only from ``cfg.cluster``; nothing site-specific is written here.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import submitit

from sdcluster.cluster.backends import slurm_preemption, slurm_queries
from sdcluster.cluster.backends.base import BoundGpus, JobEnvironment, TaskFailure

if TYPE_CHECKING:
    from sdcluster.config import Config


def slurm_parameters(cfg: Config, name: str, dependency: str | None = None) -> dict[str, Any]:
    """SlurmExecutor parameters (submitit's own names) from ``cfg.cluster``; unset values are left out."""
    c = cfg.cluster
    extra = dict(c.additional_parameters)
    if dependency:  # a failed dependency drops the job instead of leaving it PENDING forever
        extra.setdefault("kill-on-invalid-dep", "yes")
    params: dict[str, Any] = {
        "job_name": name,
        "partition": c.partition,
        "account": c.account,
        "qos": c.qos,
        "time": c.timeout_min,
        "nodes": c.nodes,
        "ntasks_per_node": c.processes_per_node,
        "cpus_per_task": c.cpus_per_task,
        "gpus_per_node": c.gpus_per_node or None,
        "mem": f"{int(c.mem_gb * 1024)}MB" if c.mem_gb else None,
        "constraint": c.constraint,
        "exclude": c.exclude,
        "signal_delay_s": c.signal_delay_s,
        "setup": list(c.setup) or None,
        "additional_parameters": extra or None,
        "array_parallelism": c.array_parallelism,
        "dependency": dependency,
        # one task that dies ends the step: the others would otherwise wait in a collective (or for a
        # rendezvous that never comes) until the time limit, holding the nodes
        "srun_args": ["--kill-on-bad-exit=1"],
    }
    return {k: v for k, v in params.items() if v is not None}


def failure_trap(cfg: Config, folder: Path) -> str:
    """The job script's line (before srun) that hands a failed srun to ``sdcluster.runtime.failures``.

    When one task dies, srun kills the others (SIGTERM, then SIGKILL after KillWait: no handler of theirs
    can be relied on), and the script ends: the batch shell is what survives, so it runs the check from a
    bash EXIT trap, given srun's exit status (``$?`` on entry: the last command's). The script keeps that
    status. A cancel, a time-out or a requeue (the job's own, at a time-out or a preemption) also ends the
    script; the module asks the scheduler (:meth:`SlurmBackend.after_failure`) and leaves those alone.
    """
    command = shlex.join(
        [
            sys.executable,  # the interpreter submitit's own command line runs (its _submitit_command_str)
            *("-m", "sdcluster.runtime.failures", "--backend", "slurm"),
            *("--folder", str(folder), "--max-failures", str(cfg.cluster.max_failures)),
        ]
    )
    return f"trap {shlex.quote(f'status=$?; {command} --status $status; exit $status')} EXIT"


class _PreviewExecutor(submitit.SlurmExecutor):
    """submitit's SLURM executor, minus its refusal to exist where ``srun`` is missing: a dry run on a
    machine without SLURM still renders the exact script. It never submits."""

    @classmethod
    def affinity(cls) -> int:
        return 1


# What a job step's environment says; any of them means SLURM runs this process (each is read on its own,
# as srun sets it: a step may lack the array or CPU variables).
_JOB_VARIABLES = (
    "SLURM_JOB_ID",
    "SLURM_RESTART_COUNT",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_PROCID",
    "SLURM_CPUS_PER_TASK",
)


def _int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def _ids(value: str | None) -> tuple[str, ...]:
    """A SLURM device list ("4,5,6,7"; UUIDs and MIG names pass as they are) as a tuple."""
    return tuple(part for part in (value or "").replace(" ", "").split(",") if part)


def _tasks_on_node(environ: Mapping[str, str]) -> int:
    """The step's tasks on this node, from SLURM's per-node counts ("4(x2)" or "3,1"), indexed by node."""
    counts: list[int] = []
    for entry in _ids(environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")):
        count, _, repeat = entry.partition("(x")
        if count.isdigit():
            counts += [int(count)] * int(repeat.rstrip(")") or 1)
    node = int(environ.get("SLURM_NODEID", "0") or 0)
    return counts[node] if node < len(counts) else max(1, int(environ.get("SLURM_NTASKS_PER_NODE", "1") or 1))


def bound_gpus(environ: Mapping[str, str]) -> BoundGpus | None:
    """The GPUs SLURM bound to this task, as it set them for the task; None when it bound none.

    SLURM sets ``CUDA_VISIBLE_DEVICES`` and ``GPU_DEVICE_ORDINAL`` (the same list) for each task: the
    step's GPUs of the node, or only the task's own with ``--gpu-bind`` / ``--gpus-per-task``, numbered
    as the task sees them (from 0 under cgroup device confinement, the node's own numbers without it).
    ``GPU_DEVICE_ORDINAL`` comes first: nothing in Python rewrites it, while submitit's distributed helper
    rewrites ``CUDA_VISIBLE_DEVICES``. ``SLURM_STEP_GPUS``/``SLURM_JOB_GPUS`` (the node's numbers, never
    renumbered) stand in where a site sets neither, and with ``SLURM_GPUS_ON_NODE`` say how many GPUs the
    step has here. Without any of them SLURM bound no GPU, and a ``CUDA_VISIBLE_DEVICES`` is the user's.
    """
    allocated = _ids(environ.get("SLURM_STEP_GPUS") or environ.get("SLURM_JOB_GPUS"))
    on_node = environ.get("SLURM_GPUS_ON_NODE", "")
    count = int(on_node) if on_node.isdigit() else len(allocated) or None
    if not count:
        return None
    visible = _ids(environ.get("GPU_DEVICE_ORDINAL") or environ.get("CUDA_VISIBLE_DEVICES")) or allocated
    if not visible:
        return None
    local_id = int(environ.get("SLURM_LOCALID", "0") or 0)
    return BoundGpus(visible, count, local_id, _tasks_on_node(environ))


class SlurmBackend:
    name = "slurm"
    title = "SLURM"
    foreground = False
    requeues = True
    resume_hint = "resubmit to resume"
    # SIGTERM is how SLURM ends a job: scancel, and preemption (PreemptMode=REQUEUE/CANCEL) at the start of
    # the partition's GraceTime. submitit's own handler only logs "Bypassing signal SIGTERM", so the job would
    # train on until the SIGKILL; the requeue protocol installs its handler after submitit's (inside the
    # job's callable), so the save at the next step wins. USR2 (the time-limit warning, or preemption with
    # PreemptParameters=send_user_signal) still goes through the requeue protocol.
    stop_signals = (signal.SIGTERM,)

    def executor(
        self, cfg: Config, folder: Path, name: str, after: str | None, preview: bool = False
    ) -> submitit.SlurmExecutor:
        # submitit would also count preemptions as time-outs for short limits; our own records enforce
        # cluster.max_requeues / max_timeouts, so submitit's counter is only set high enough never to decide.
        budget = cfg.cluster.max_timeouts + cfg.cluster.max_requeues + 1
        executor_class = _PreviewExecutor if preview else submitit.SlurmExecutor
        executor = executor_class(folder=folder, max_num_timeout=budget)
        params = slurm_parameters(cfg, name, f"afterok:{after}" if after else None)
        # after the site's setup lines (a module load or a venv may be what makes the interpreter run)
        params["setup"] = [*params.get("setup", []), failure_trap(cfg, folder)]
        executor.update_parameters(**params)
        return executor

    def script(self, cfg: Config, folder: Path, name: str, after: str | None, array_size: int | None) -> str:
        from submitit.slurm.slurm import _make_sbatch_string  # submitit's own renderer: the preview is exact

        executor = self.executor(cfg, folder, name, after, preview=True)
        array = {"map_count": array_size} if array_size else {}
        command = executor._submitit_command_str
        return _make_sbatch_string(command=command, folder=folder, **executor.parameters, **array)

    # The checks are imported when asked: only the login side asks, and the job imports this backend for
    # its environment without the schema's modules above config.checks.
    def check_script(self, kind: str, script: str) -> None:
        from sdcluster.cluster.backends import slurm_checks

        slurm_checks.check_script(kind, script)

    def own_keys(self) -> tuple[str, ...]:
        from sdcluster.cluster.backends import slurm_checks

        return slurm_checks.SLURM_ONLY

    def login_node(self, environ: Mapping[str, str]) -> str | None:
        from sdcluster.cluster.backends import slurm_checks

        return slurm_checks.login_node(environ)

    def check_config(self, cfg: Config) -> None:
        from sdcluster.cluster.backends import slurm_checks

        slurm_checks.check_config(cfg)

    def check(self, cfg: Config, dry_run: bool) -> list[str]:
        from sdcluster.cluster.backends import slurm_checks

        return slurm_checks.check_cluster(cfg, dry_run)

    def job_state(self, job_id: str) -> tuple[str, str] | None:
        return slurm_queries.job_state(job_id)

    def job_states(self, job_id: str) -> list[str] | None:
        return slurm_queries.job_states(job_id)

    def view(self, job_ids: list[str]) -> dict[str, tuple[str, str]]:
        """One ``sacct`` call for all ``job_ids`` (asking job by job would take seconds for a long list)."""
        if not job_ids:
            return {}
        cmd = ["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", "JobID,State,NodeList"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            return {}
        view = {}
        for line in out.stdout.splitlines() if out.returncode == 0 else []:
            job_id, state, nodes = [*line.split("|"), "", ""][:3]
            view[job_id] = (state.split()[0] if state else "?", "" if nodes == "None assigned" else nodes)
        return view

    def stop_hint(self, job_id: str) -> str:
        return f"scancel {job_id}"

    def cluster_name(self) -> str | None:
        return slurm_queries.cluster_name()

    def preemption(self) -> str | None:
        """None unless SLURM chose this job for preemption (``PreemptTime`` set while it runs: a ``scancel``
        sets none); then what the job's PreemptMode does with it (``REQUEUE``, ``CANCEL``), or "" when
        SLURM does not say."""
        job_id = os.environ.get("SLURM_JOB_ID", "")
        fields = slurm_queries.job_fields(job_id) if job_id else {}
        if fields.get("JobState") != "RUNNING" or fields.get("PreemptTime", "None") in ("None", ""):
            return None
        return slurm_preemption.preempt_mode(fields.get("Partition", ""), fields.get("QOS", "")) or ""

    def after_failure(self, log_text: str) -> TaskFailure | None:
        """A failure when SLURM still runs the job (the batch shell is ending on its own) and is not
        preempting it; else None: scancel, the time limit, preemption and any requeue or cancel the job
        asked for itself (at a time-out or a preemption) change JobState before the script ends.
        Unanswered: None too, since requeueing a job that SLURM cancelled would bring it back against the
        user's word."""
        job_id = os.environ.get("SLURM_JOB_ID")
        fields = slurm_queries.job_fields(job_id) if job_id else {}
        if fields.get("JobState") != "RUNNING" or fields.get("PreemptTime", "None") not in ("None", ""):
            return None
        told = slurm_queries.failed_task(log_text)
        return TaskFailure(*told) if told else TaskFailure(node=os.environ.get("SLURMD_NODENAME"))

    def requeue(self) -> None:
        slurm_queries.requeue(os.environ["SLURM_JOB_ID"])  # an array task's own id: only that task

    def cancel(self) -> None:
        slurm_queries.cancel(os.environ["SLURM_JOB_ID"])  # an array task's own id: only that task

    def end_time(self) -> float | None:
        job_id = os.environ.get("SLURM_JOB_ID")
        return slurm_queries.end_time(job_id) if job_id else None

    def job_environment(self) -> JobEnvironment:
        return JobEnvironment(
            inside=any(name in os.environ for name in _JOB_VARIABLES),
            restart_count=_int("SLURM_RESTART_COUNT") or 0,
            array_task=os.environ.get("SLURM_ARRAY_TASK_ID"),
            rank=_int("SLURM_PROCID") or 0,
            cpus_per_task=_int("SLURM_CPUS_PER_TASK"),
            gpus=bound_gpus(os.environ),
        )
