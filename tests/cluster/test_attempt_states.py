"""An attempt stopped by a signal is CANCELLED until the scheduler brings the job back: then PREEMPTED."""

from __future__ import annotations

from sdcluster.cluster import records


def _stopped_by_sigterm(folder) -> None:
    records.start_attempt(folder, restart_count=0)
    records.end_attempt(folder, "CANCELLED", step=3, exit_reason="stopped by SIGTERM", requeued=False)


def test_a_stopped_job_that_comes_back_was_preempted(tmp_path):
    _stopped_by_sigterm(tmp_path)
    records.start_attempt(tmp_path, restart_count=1)  # SLURM requeued it: its restart count went up
    first, second = records.read(tmp_path)["attempts"]
    assert (first["state"], first["requeued"], first["step"]) == ("PREEMPTED", True, 3)
    assert first["exit_reason"] == "preempted (stopped by SIGTERM)"
    assert "state" not in second and records.read(tmp_path)["state"] == "RUNNING"


def test_a_stopped_job_that_does_not_come_back_stays_cancelled(tmp_path):
    _stopped_by_sigterm(tmp_path)
    assert records.read(tmp_path)["attempts"][-1]["state"] == "CANCELLED"
    # the same restart count again (a record written twice): no requeue happened, nothing is corrected
    records.start_attempt(tmp_path, restart_count=0)
    assert records.read(tmp_path)["attempts"][0]["state"] == "CANCELLED"


def test_other_ends_are_left_as_recorded(tmp_path):
    records.start_attempt(tmp_path, restart_count=0)
    records.end_attempt(tmp_path, "TIMEOUT", step=5, exit_reason="timeout", requeued=True)
    records.start_attempt(tmp_path, restart_count=1)
    assert records.read(tmp_path)["attempts"][0]["state"] == "TIMEOUT"
