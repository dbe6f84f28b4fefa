"""On the real cluster: a held job's folder (the pickle and script it will run as you) and everything the job
adds to it are writable by you alone, whatever your umask; the run's outputs follow the umask."""

from __future__ import annotations

import subprocess

import pytest

from sdcluster import atomic
from tests.cluster.test_permissions import expected_jobs_modes, expected_output_modes, modes_under
from tests.slurm_helpers import launch, wait_for

pytestmark = pytest.mark.slurm


def test_a_held_jobs_files_stay_the_owners_until_and_after_it_runs(
    slurm_cluster, tmp_path, cache_root, tiny_model
):
    """umask 002 with a shared jobs/: a group member could otherwise rewrite ``<id>_submitted.pkl`` while the
    job is held, and after ``scontrol release`` it would run their code as you."""
    hold = ["cluster.share_jobs_with_group=true", "+cluster.additional_parameters.hold=true"]
    with atomic.umask(0o002):  # the launcher and its sbatch inherit it, as from a user's shell
        proc, ids = launch(tmp_path, cache_root, "task=train", "train.max_steps=2", *hold)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job_id,) = ids["train"]
    jobs = tmp_path / "jobs"
    try:
        queued = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True)
        assert queued.stdout.split() == ["PENDING", "JobHeldUser"], queued
        held = modes_under(jobs)
        assert {f"{job_id}/{job_id}_submitted.pkl", f"{job_id}/{job_id}_submission.sh"} <= set(held)
        assert held == expected_jobs_modes(held, jobs, share=True), "group-writable while held"
    finally:
        subprocess.run(["scontrol", "release", job_id], check=True, timeout=30)
    assert wait_for(job_id)[0] == "COMPLETED"

    ran = modes_under(jobs)
    assert {f"{job_id}/{job_id}_0_result.pkl", f"{job_id}/{job_id}_0_log.out"} <= set(ran)
    assert ran == expected_jobs_modes(ran, jobs, share=True), "the job's own files in jobs/<id>/"
    run = next((tmp_path / "outputs" / "runs").iterdir())
    written = modes_under(run)
    assert any(rel.endswith(".safetensors") for rel in written)
    assert written == expected_output_modes(written, run, 0o002), "the job's outputs follow the umask"
