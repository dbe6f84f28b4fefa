"""SIGTERM, as real sites send it: preemption by a higher partition and ``scancel``. The job saves at the
next step or batch boundary and leaves well within the grace time: preempted where the site requeues, it
requeues itself (accounting says REQUEUED, once); where the site cancels, or after a ``scancel``, it ends
CANCELLED and the same command resumes.

The sandbox preempts by partition priority: a job on ``high`` that needs the whole node preempts jobs on
``low`` (``PreemptMode=REQUEUE``) and ``lowcancel`` (``PreemptMode=CANCEL``), both with ``GraceTime=20``;
``debug`` and ``short`` are never preempted.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdcluster.train import step_folders
from tests.sandbox.configs import GRACE_TIME_S
from tests.slurm_helpers import (
    PREEMPTIBLE_GENERATION,
    job_record,
    launch,
    live_jobs_under,
    logs_cli,
    preempt_node,
    sacct_history,
    wait_for,
    wait_for_line,
    wait_until,
)

pytestmark = pytest.mark.slurm

# checkpoint_every far beyond max_steps: the only checkpoint before the end is the one SIGTERM asks for
TRAIN = ["task=train", "train.log_every=1", "train.checkpoint_every=100", "train.max_steps=10"]
LOW = "cluster.partition=low"


def _runs(job_id: str) -> list[dict[str, str]]:
    """Every run accounting holds for ``job_id`` (a requeued job's earlier runs too), oldest first: its
    State and its Submit, Start and End times in epoch seconds."""
    fields = ("State", "Submit", "Start", "End")
    out = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", ",".join(fields)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, "SLURM_TIME_FORMAT": "%s"},
    )
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    return [dict(zip(fields, line.split("|"), strict=True)) for line in lines]


def _held_after_preemption(job_id: str, preemptor: str) -> int:
    """Seconds from the preemptor's submission (no later than the preemption) to the end of the job's
    first run: under GraceTime when the job left on its own, not when SLURM killed it."""
    (asked,) = _runs(preemptor)
    return int(_runs(job_id)[0]["End"]) - int(asked["Submit"])


def test_the_backend_reads_how_each_partition_ends_a_preempted_job(slurm_cluster, monkeypatch):
    from sdcluster.cluster.backends import slurm_preemption
    from sdcluster.cluster.backends.slurm import SlurmBackend

    modes = {part: slurm_preemption.preempt_mode(part, "normal") for part in ("low", "lowcancel", "debug")}
    assert modes == {"low": "REQUEUE", "lowcancel": "CANCEL", "debug": "OFF"}
    assert slurm_preemption.preempt_mode("no-such-partition", "normal") is None
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert SlurmBackend().preemption() is None  # outside a job nothing is being preempted


def _final_weights(run_dir: str) -> dict[str, torch.Tensor]:
    newest = step_folders.complete_checkpoints(Path(run_dir) / "checkpoints")[0]
    return load_file(str(newest / "model.safetensors"))


@pytest.mark.slurm_serial  # preempt_node: the preemptor needs the node to itself
def test_preempted_training_resumes_at_the_step_sigterm_came(slurm_cluster, tmp_path, cache_root):
    shape = ["cluster.tasks_per_node=2", "cluster.cpus_per_task=1", "train.grad_accum=2"]
    proc, ids = launch(tmp_path / "a", cache_root, *TRAIN, *shape)
    assert proc.returncode == 0, proc.stderr
    (straight_id,) = ids["train"]
    assert wait_for(straight_id)[0] == "COMPLETED"  # the node is free for the preempted run alone

    pause = {"SDCLUSTER_TEST_PAUSE": "step:3"}  # held at step 3 until a signal: preempted mid-run
    proc, ids = launch(tmp_path / "b", cache_root, *TRAIN, *shape, LOW, env=pause)
    assert proc.returncode == 0, proc.stderr
    (job_id,) = ids["train"]
    log = tmp_path / "b" / "jobs" / job_id / f"{job_id}_0_log.out"
    wait_for_line(log, r"paused at step 3 ")
    preemptor = preempt_node(tmp_path)
    assert wait_for(job_id, timeout_s=240)[0] == "COMPLETED"
    assert wait_for(preemptor)[0] == "COMPLETED"

    # the job requeued itself, once, well before SLURM's kill (which would read PREEMPTED, and requeue)
    assert sacct_history(job_id) == ["REQUEUED", "COMPLETED"]
    assert _held_after_preemption(job_id, preemptor) < GRACE_TIME_S
    record = job_record(tmp_path / "b", job_id)
    first, second = record["attempts"]
    assert (first["state"], first["requeued"], first["step"]) == ("PREEMPTED", True, 3)
    assert first["exit_reason"] == "preempted (stopped by SIGTERM)"
    assert (second["state"], second["restart_count"], second["step"]) == ("COMPLETED", 1, 10)
    assert f"resumed from {record['run_dir']}/checkpoints/step-00000003" in log.read_text()
    shown = logs_cli(tmp_path / "b", job_id).stdout
    assert "attempt 1 (restart 0): state PREEMPTED" in shown
    assert "attempt 2 (restart 1): state COMPLETED" in shown

    straight_run = job_record(tmp_path / "a", straight_id)["run_dir"]
    a, b = _final_weights(straight_run), _final_weights(record["run_dir"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume was not exact"


@pytest.mark.slurm_serial  # preempt_node: the preemptor needs the node to itself
def test_preempted_generation_shard_loses_and_repeats_nothing(
    slurm_cluster, tmp_path, cache_root, tiny_model
):
    gen = [
        *PREEMPTIBLE_GENERATION,
        f"generate.model={tiny_model}",
        "generate.shards=2",
        LOW,
    ]
    proc, ids = launch(tmp_path, cache_root, *gen, env={"SDCLUSTER_TEST_PAUSE": "batch:2@0"})
    assert proc.returncode == 0, proc.stderr
    shard0, shard1 = ids["generate"]
    log = tmp_path / "jobs" / shard0 / f"{shard0}_0_log.out"
    wait_for_line(log, r"paused at batch 2 ")
    # shard 1 is not held: it must be done before the preemptor comes, or (on a loaded machine) it is
    # preempted too, at whatever batch it has reached
    assert wait_for(shard1, timeout_s=240)[0] == "COMPLETED"
    preemptor = preempt_node(tmp_path)
    assert wait_for(shard0, timeout_s=240)[0] == "COMPLETED"
    assert wait_for(preemptor)[0] == "COMPLETED"

    assert sacct_history(shard0) == ["REQUEUED", "COMPLETED"]
    assert _held_after_preemption(shard0, preemptor) < GRACE_TIME_S
    record = job_record(tmp_path, shard0)
    first, second = record["attempts"]
    assert (first["state"], first["requeued"], first["step"]) == ("PREEMPTED", True, 4)  # batch finished
    assert second["state"] == "COMPLETED"
    assert f"{first['step']} already done" in log.read_text()
    out = Path(record["outputs"]["images"])
    files = [json.loads(ln)["file"] for ln in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(files) == 24 == len(set(files)) == len(list(out.glob("p*-i*.png")))


def _the_same_command_resumes_at_step_3(tmp_path, cache_root, record, *extra: str) -> None:
    """The command that launched the stopped run, typed again, finishes it from its step-3 checkpoint."""
    proc, ids = launch(tmp_path, cache_root, *TRAIN, *extra)
    assert proc.returncode == 0, proc.stderr
    (again,) = ids["train"]
    assert wait_for(again)[0] == "COMPLETED"
    resumed = job_record(tmp_path, again)
    assert resumed["run_dir"] == record["run_dir"] and resumed["attempts"][-1]["step"] == 10
    again_log = (tmp_path / "jobs" / again / f"{again}_0_log.out").read_text()
    assert f"resumed from {record['run_dir']}/checkpoints/step-00000003" in again_log


def test_scancel_saves_and_the_same_command_resumes(slurm_cluster, tmp_path, cache_root):
    proc, ids = launch(tmp_path, cache_root, *TRAIN, env={"SDCLUSTER_TEST_PAUSE": "step:3"})
    assert proc.returncode == 0, proc.stderr
    (job_id,) = ids["train"]
    log = tmp_path / "jobs" / job_id / f"{job_id}_0_log.out"
    wait_for_line(log, r"paused at step 3 ")
    subprocess.run(["scancel", job_id], check=True, timeout=30)  # SIGTERM, then SIGKILL after KillWait
    assert wait_for(job_id)[0] == "CANCELLED"  # at once: the job itself may still be saving
    assert wait_until(lambda: not live_jobs_under(tmp_path, slurm_cluster.slurm_conf), timeout_s=60)
    record = job_record(tmp_path, job_id)
    (attempt,) = record["attempts"]
    assert (attempt["state"], attempt["step"]) == ("CANCELLED", 3)
    assert attempt["exit_reason"] == "stopped by SIGTERM"
    saved = step_folders.complete_checkpoints(Path(record["run_dir"]) / "checkpoints")
    assert [step_folders.read_meta(folder).step for folder in saved] == [3]
    shown = logs_cli(tmp_path, job_id).stdout
    assert "attempt 1 (restart 0): state CANCELLED" in shown
    assert "stopped early, its work saved: the same command resumes it" in shown

    _the_same_command_resumes_at_step_3(tmp_path, cache_root, record)


@pytest.mark.slurm_serial  # preempt_node: the preemptor needs the node to itself
def test_preempted_where_the_site_cancels_saves_and_the_same_command_resumes(
    slurm_cluster, tmp_path, cache_root
):
    cancel = "cluster.partition=lowcancel"
    pause = {"SDCLUSTER_TEST_PAUSE": "step:3"}
    proc, ids = launch(tmp_path, cache_root, *TRAIN, cancel, env=pause)
    assert proc.returncode == 0, proc.stderr
    (job_id,) = ids["train"]
    log = tmp_path / "jobs" / job_id / f"{job_id}_0_log.out"
    wait_for_line(log, r"paused at step 3 ")
    preemptor = preempt_node(tmp_path)
    assert wait_for(job_id, timeout_s=240)[0] == "CANCELLED"
    assert wait_for(preemptor)[0] == "COMPLETED"

    # ended by its own hand within the grace time, as cancelled (a job SLURM kills reads PREEMPTED)
    assert sacct_history(job_id) == ["CANCELLED"]
    assert _held_after_preemption(job_id, preemptor) < GRACE_TIME_S
    record = job_record(tmp_path, job_id)
    (attempt,) = record["attempts"]
    assert (attempt["state"], attempt["requeued"], attempt["step"]) == ("CANCELLED", False, 3)
    assert attempt["exit_reason"] == "preempted, cancelled by the site (stopped by SIGTERM)"
    shown = logs_cli(tmp_path, job_id).stdout
    assert "attempt 1 (restart 0): state CANCELLED" in shown
    assert "preempted, cancelled by the site" in shown
    assert "stopped early, its work saved: the same command resumes it" in shown

    _the_same_command_resumes_at_step_3(tmp_path, cache_root, record, cancel)
