"""The SLURM sandbox behaves like a real cluster for what sdcluster relies on: partitions, multi-task jobs,
sacct states, failures with tracebacks, and USR2 preemption with requeue of a Checkpointable."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import submitit

from tests import sandbox

pytestmark = pytest.mark.slurm


def rank_and_size() -> tuple[int, int]:
    env = submitit.JobEnvironment()
    return env.global_rank, env.num_tasks


def fail_loudly() -> None:
    raise ValueError("boom from inside the job")


class WaitForPreemption(submitit.helpers.Checkpointable):
    """First run: tell the test it is running, then idle until USR2 requeues it. Second run: report."""

    def __init__(self, started_flag: str) -> None:
        self.started_flag = started_flag

    def __call__(self) -> int:
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        if restarts == 0:
            # submitit installed its USR2 handler before calling us, so the signal is safe to send now.
            Path(self.started_flag).touch()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                time.sleep(0.2)
            raise TimeoutError("USR2 never arrived")
        return restarts


def _executor(tmp_path: Path, **params: object) -> submitit.AutoExecutor:
    # cluster="slurm": fail rather than silently fall back to local processes if sbatch is missing.
    ex = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    ex.update_parameters(slurm_partition="debug", nodes=1, cpus_per_task=1, timeout_min=20, **params)
    return ex


def _sacct_state(job_id: str, want: str, timeout: float = 30) -> str:
    """The job's state in accounting, polled: slurmdbd records the end a moment after the job ends."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        argv = ["sacct", "-j", job_id, "-n", "-X", "-P", "-o", "State"]
        out = subprocess.run(argv, capture_output=True, text=True, check=True)
        state = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
        if state == want:
            break
        time.sleep(0.5)
    return state


def test_cluster_has_both_partitions(slurm_cluster) -> None:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout
    assert {p.rstrip("*") for p in out.split()} >= {"debug", "short"}  # `*` marks the default partition
    assert slurm_cluster.partitions == ["debug", "short"]


def test_two_task_job_sees_ranks_and_completes(slurm_cluster, tmp_path: Path) -> None:
    job = _executor(tmp_path, tasks_per_node=2).submit(rank_and_size)
    results = job.results()
    assert sorted(rank for rank, _ in results) == [0, 1]
    assert {size for _, size in results} == {2}
    assert _sacct_state(job.job_id, "COMPLETED") == "COMPLETED"


def test_failing_job_is_failed_with_traceback(slurm_cluster, tmp_path: Path) -> None:
    job = _executor(tmp_path, tasks_per_node=1).submit(fail_loudly)
    with pytest.raises(submitit.core.utils.FailedJobError, match="boom from inside the job") as err:
        job.result()
    assert "Traceback" in str(err.value) and "ValueError" in str(err.value)
    assert _sacct_state(job.job_id, "FAILED") == "FAILED"


def test_usr2_preemption_requeues_checkpointable(slurm_cluster, tmp_path: Path) -> None:
    flag = tmp_path / "first-run-started"
    # timeout_min=20: submitit treats a USR2 after min(0.8 x limit, limit - 10 min) as a timeout, not a
    # preemption; with 20 min that is 10 min away, far beyond this test.
    job = _executor(tmp_path, tasks_per_node=1).submit(WaitForPreemption(str(flag)))
    deadline = time.monotonic() + 180  # generous: on 2 cores the job may queue behind others
    while not flag.exists():
        assert time.monotonic() < deadline, f"first run never started: {job.state}\n{job.stderr()}"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True)
    assert job.result() == 1  # SLURM_RESTART_COUNT in the requeued run
    assert _sacct_state(job.job_id, "COMPLETED") == "COMPLETED"


def test_start_again_reuses_the_running_cluster(slurm_cluster) -> None:
    from tests.sandbox.daemons import _pid
    from tests.sandbox.spec import DAEMONS

    before = {daemon.name: _pid(slurm_cluster.state_dir, daemon) for daemon in DAEMONS}
    info = sandbox.start(slurm_cluster.state_dir)
    after = {daemon.name: _pid(slurm_cluster.state_dir, daemon) for daemon in DAEMONS}
    assert None not in before.values() and after == before, "a healthy sandbox must be reused, not restarted"
    assert info == slurm_cluster and sandbox.is_running(info.state_dir)
