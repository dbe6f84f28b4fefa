"""Failures come back within a budget: a job whose work failed (a rank killed, an error on every attempt)
is requeued by its own script within ``cluster.max_failures``, resumes from its newest checkpoint, and is
not retried when it fails again at the same step; ``sdcluster logs`` says where it failed.

The decision is unit-tested on records; the path through the batch shell's EXIT trap, srun and
``scontrol requeue`` runs on the real sandbox.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from sdcluster.cluster import records
from sdcluster.cluster.backends import slurm_queries
from sdcluster.cluster.backends.base import TaskFailure
from sdcluster.config import ConfigError
from sdcluster.runtime import failures
from tests.sandbox import layout, netns
from tests.sandbox.layout import Node
from tests.slurm_helpers import job_record, launch, logs_cli, wait_for, wait_for_line

TRAIN = ["task=train", "train.log_every=1", "train.checkpoint_every=2", "train.max_steps=6"]


def test_a_failure_is_requeued_within_the_budget_and_not_at_the_same_step_twice():
    failed = {"state": "FAILED", "requeued": True}
    assert failures.decide([], 3, 2)[0]
    assert failures.decide([{"state": "PREEMPTED", "step": 3}], 3, 2)[0]  # only failures repeat
    assert failures.decide([{**failed, "step": 2}], 3, 2) == (True, "requeued (2 of cluster.max_failures=2)")
    again, why = failures.decide([{**failed, "step": 3}], 3, 2)
    assert not again and "previous attempt failed at step 3 too" in why
    spent, why = failures.decide([{**failed, "step": 1}, {**failed, "step": 2}], 3, 2)
    assert not spent and "cluster.max_failures=2, used 2" in why
    assert failures.decide([{**failed, "step": None}], None, 2)[0]  # an unknown step repeats nothing
    assert not failures.decide([], 3, 0)[0]


class _Scheduler:
    """A stand-in backend for the record logic: what the scheduler says, and the requeues asked of it."""

    def __init__(self, failure: TaskFailure | None) -> None:
        self.failure, self.requeued, self.seen = failure, 0, ""

    def after_failure(self, log_text: str) -> TaskFailure | None:
        self.seen = log_text
        return self.failure

    def requeue(self) -> None:
        self.requeued += 1


def _job(tmp_path: Path, attempts: list[dict]) -> Path:
    folder = tmp_path / "jobs" / "7"
    records.update(folder, {"task": "train", "attempts": attempts, "state": "RUNNING"})
    return folder


def test_the_failed_attempt_is_recorded_with_where_and_requeued(tmp_path):
    folder = _job(tmp_path, [{"restart_count": 0, "started": records.now(), "step": 4}])
    scheduler = _Scheduler(TaskFailure("node7", 1, "Killed"))
    log = "srun: error: node7: task 1: Killed (an earlier attempt)\nsdcluster: attempt 1 failed: x\nnow\n"
    assert failures.handle(folder, scheduler, 137, 2, log)  # type: ignore[arg-type]
    assert scheduler.requeued == 1 and scheduler.seen == "\nnow\n"  # only this attempt's launcher lines
    (attempt,) = records.read(folder)["attempts"]
    assert (attempt["state"], attempt["step"], attempt["requeued"]) == ("FAILED", 4, True)
    assert (attempt["failed_node"], attempt["failed_rank"]) == ("node7", 1)
    assert attempt["exit_reason"].startswith("Killed (rank 1 on node node7) at step 4; requeued (1 of")


@pytest.mark.parametrize(
    "last",
    [
        {"state": "COMPLETED"},
        {"state": "TIMEOUT", "requeued": True},  # submitit's requeue at the time limit
        {"state": "PREEMPTED", "requeued": True},
    ],
)
def test_an_attempt_the_job_ended_itself_is_left_alone(tmp_path, last):
    folder = _job(tmp_path, [{"restart_count": 0, **last}])
    scheduler = _Scheduler(TaskFailure("n", 0, "Killed"))
    assert not failures.handle(folder, scheduler, 1, 2, "")  # type: ignore[arg-type]
    assert scheduler.requeued == 0 and records.read(folder)["attempts"][-1]["state"] == last["state"]


def test_what_the_scheduler_ends_itself_and_a_clean_exit_are_left_alone(tmp_path):
    folder = _job(tmp_path, [{"restart_count": 0}])
    cancelled = _Scheduler(None)  # scancel, the time limit, a preemption: the backend says None
    assert not failures.handle(folder, cancelled, 143, 2, "")  # type: ignore[arg-type]
    clean = _Scheduler(TaskFailure())
    assert not failures.handle(folder, clean, 0, 2, "")  # type: ignore[arg-type]
    assert cancelled.requeued == clean.requeued == 0 and "state" not in records.read(folder)["attempts"][0]


def test_srun_names_the_first_task_that_failed():
    text = (
        "srun: error: vm: task 1: Killed\n"
        "srun: launch/slurm: _step_signal: Terminating StepId=283.0\n"
        "srun: error: vm: task 0: Killed\n"
    )
    assert slurm_queries.failed_task(text) == ("vm", 1, "Killed")
    assert slurm_queries.failed_task("srun: error: gpu-2: tasks 0-3: Exited with exit code 2") == (
        "gpu-2",
        0,
        "Exited with exit code 2",
    )
    assert slurm_queries.failed_task("nothing failed") is None


def test_the_job_script_hands_a_failed_srun_to_the_failure_check(make_cfg):
    from sdcluster.cluster import backends

    cfg = make_cfg(["+cluster=slurm", "cluster.max_failures=1", "cluster.setup=[echo site]"])
    script = backends.of(cfg).script(cfg, Path(cfg.jobs_root) / "%j", "x", None, None)
    lines = script.splitlines()
    trap = next(i for i, line in enumerate(lines) if line.startswith("trap "))
    assert lines.index("echo site") < trap < next(i for i, ln in enumerate(lines) if ln.startswith("srun "))
    assert "-m sdcluster.runtime.failures --backend slurm" in lines[trap]
    assert "--max-failures 1 --status $status; exit $status' EXIT" in lines[trap]
    backends.of(cfg).check_script("train", script)  # bash -n: the quoting holds


def test_a_negative_failure_budget_is_refused(make_cfg):
    with pytest.raises(ConfigError, match=r"cluster.max_failures.*>= 0"):
        make_cfg(["cluster.max_failures=-1"])


def _rank_pids(job_id: str, rank: int, node: Node | None = None) -> list[int]:
    """The processes of global rank ``rank`` of the job's step 0, as slurmd tracks them.

    ``scontrol listpids`` asks the slurmstepds of the node it runs on, found by hostname; for a namespaced
    node of the two-node sandbox it runs inside that node's namespaces (the pids are this machine's).
    """
    argv = ["scontrol", "listpids", job_id]
    out = subprocess.run(
        netns.inside(node, argv) if node else argv, capture_output=True, text=True, timeout=30, check=True
    )
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    return [int(r[0]) for r in rows if len(r) == 5 and r[2] == "0" and r[4] == str(rank)]


def _sacct_runs(job_id: str) -> list[tuple[str, str]]:
    """(state, derived exit code) of every run of a requeued job, oldest first."""
    cmd = ["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "State,DerivedExitCode"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    return [(state.split()[0], code) for state, _, code in (ln.partition("|") for ln in out.splitlines())]


@pytest.mark.slurm
def test_a_killed_rank_is_requeued_and_resumes_from_its_checkpoint(slurm_cluster, tmp_path, cache_root):
    shape = ["cluster.tasks_per_node=2", "cluster.cpus_per_task=1"]
    proc, ids = launch(tmp_path, cache_root, *TRAIN, *shape, env={"SDCLUSTER_TEST_PAUSE": "step:3"})
    assert proc.returncode == 0, proc.stderr
    (job_id,) = ids["train"]
    folder = tmp_path / "jobs" / job_id
    wait_for_line(folder / f"{job_id}_1_log.out", r"paused at step 3 ")
    pids = _rank_pids(job_id, 1)
    assert pids, "slurmd tracks no process of rank 1"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert wait_for(job_id, timeout_s=240)[0] == "COMPLETED"

    runs = _sacct_runs(job_id)
    assert [state for state, _ in runs] == ["REQUEUED", "COMPLETED"]
    assert runs[0][1] == "0:9"  # the first run's step ended by SIGKILL
    record = job_record(tmp_path, job_id)
    first, second = record["attempts"]
    assert (first["state"], first["step"], first["requeued"]) == ("FAILED", 3, True)
    assert (first["failed_rank"], first["failed_node"]) == (1, slurm_cluster.node)
    assert (second["state"], second["restart_count"], second["step"]) == ("COMPLETED", 1, 6)
    log = (folder / f"{job_id}_0_log.out").read_text()
    assert f"resumed from {record['run_dir']}/checkpoints/step-00000002" in log
    shown = logs_cli(tmp_path, job_id).stdout
    assert "attempt 1 (restart 0): state FAILED, step 3, exit_reason Killed (rank 1 on node" in shown
    assert "attempt 2 (restart 1): state COMPLETED" in shown


@pytest.mark.slurm
def test_a_failure_at_the_same_step_is_retried_once_then_stops(slurm_cluster, tmp_path, cache_root):
    proc, ids = launch(tmp_path, cache_root, *TRAIN, env={"SDCLUSTER_TEST_FAIL": "step:3"})
    assert proc.returncode == 0, proc.stderr
    (job_id,) = ids["train"]
    assert wait_for(job_id, timeout_s=240)[0] == "FAILED"

    assert [state for state, _ in _sacct_runs(job_id)] == ["REQUEUED", "FAILED"]
    first, second = job_record(tmp_path, job_id)["attempts"]
    assert (first["state"], first["step"], first["requeued"]) == ("FAILED", 3, True)
    assert (second["state"], second["step"], second["requeued"]) == ("FAILED", 3, False)
    assert "failing at step 3 on rank 0" in second["error"]
    assert "not requeued: the previous attempt failed at step 3 too" in second["exit_reason"]
    log = (tmp_path / "jobs" / job_id / f"{job_id}_0_log.out").read_text()
    assert "checkpoints/step-00000002" in log  # the retry resumed before it failed again
    shown = logs_cli(tmp_path, job_id).stdout
    assert "Exited with exit code 1 (rank 0 on node" in shown and "failed at step 3 too" in shown


@pytest.mark.slurm
def test_a_rank_killed_on_the_second_node_is_requeued_and_resumes(slurm_two_nodes, tmp_path, cache_root):
    """The same on two nodes: rank 1 dies on n2, srun on n1 names it, and the batch shell on n1 requeues."""
    shape = ["cluster.nodes=2", "cluster.tasks_per_node=1", "cluster.cpus_per_task=1"]
    fast = ["train.validation_prompts=[]"]  # the held-out loss only: validation images cost seconds here
    proc, ids = launch(tmp_path, cache_root, *TRAIN, *shape, *fast, env={"SDCLUSTER_TEST_PAUSE": "step:3"})
    assert proc.returncode == 0, proc.stderr
    (job_id,) = ids["train"]
    folder = tmp_path / "jobs" / job_id
    wait_for_line(folder / f"{job_id}_1_log.out", r"paused at step 3 ")
    second = layout.saved(slurm_two_nodes.state_dir).nodes[1]
    assert second.name == "n2"
    pids = _rank_pids(job_id, 1, second)
    assert pids, "slurmd on n2 tracks no process of rank 1"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert wait_for(job_id, timeout_s=240)[0] == "COMPLETED"

    assert [state for state, _ in _sacct_runs(job_id)] == ["REQUEUED", "COMPLETED"]
    record = job_record(tmp_path, job_id)
    first, again = record["attempts"]
    assert (first["state"], first["step"], first["requeued"]) == ("FAILED", 3, True)
    assert (first["failed_rank"], first["failed_node"], first["host"]) == (1, "n2", "n1")
    assert (again["state"], again["restart_count"], again["step"]) == ("COMPLETED", 1, 6)
    log = (folder / f"{job_id}_0_log.out").read_text()
    assert f"resumed from {record['run_dir']}/checkpoints/step-00000002" in log
    task1 = (folder / f"{job_id}_1_log.out").read_text()
    assert task1.count("hostname=n2,") == 2  # rank 1 came back on its own node
    shown = logs_cli(tmp_path, job_id).stdout
    failed = "attempt 1 (restart 0): state FAILED, step 3, exit_reason Killed (rank 1 on node n2) at step 3"
    assert failed in shown
    assert "attempt 2 (restart 1): state COMPLETED" in shown
