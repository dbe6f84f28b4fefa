"""Local jobs a person stops: Ctrl-C saves and says how to resume; a job killed without a word shows so."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.slurm_helpers import wait_for_line

pytestmark = pytest.mark.slow

TRAIN = ["debug=fast", "task=train", "train.max_steps=6", "train.checkpoint_every=100"]


def _start(
    tmp: Path, cache_root: Path, pause: str, sigint: signal.Handlers = signal.SIG_DFL
) -> tuple[subprocess.Popen, Path]:
    """The launcher as a terminal runs it: its own process group (the terminal's foreground group).

    ``sigint``: the disposition it inherits; ``SIG_IGN`` as for a background job of a non-interactive shell.
    """
    out = tmp / "launch.out"
    args = [sys.executable, "-m", "sdcluster.launch", *TRAIN]
    args += [f"output_root={tmp / 'outputs'}", f"jobs_root={tmp / 'jobs'}", f"cache_root={cache_root}"]
    env = {**os.environ, "SDCLUSTER_HOME": str(tmp / "home"), "SDCLUSTER_TEST_PAUSE": pause}
    with out.open("w") as fh:
        proc = subprocess.Popen(
            args,
            cwd=tmp,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint),
        )
    return proc, out


def _job(tmp: Path, out: Path) -> tuple[str, Path]:
    job_id = re.search(r"submitted train job (\S+):", wait_for_line(out, r"submitted train job")).group(1)
    return job_id, tmp / "jobs" / job_id


def _logs(tmp: Path, *args: str) -> str:
    env = {**os.environ, "SDCLUSTER_HOME": str(tmp / "home")}
    cmd = [sys.executable, "-m", "sdcluster.logs", "--jobs-root", str(tmp / "jobs"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60, env=env).stdout


def test_ctrl_c_stops_at_a_step_with_a_checkpoint_and_the_same_command_resumes(
    tmp_path, cache_root, tiny_model
):
    proc, out = _start(tmp_path, cache_root, "step:2")
    job_id, folder = _job(tmp_path, out)
    wait_for_line(folder / f"{job_id}_0_log.out", r"paused at step 2 ")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: SIGINT to the whole foreground group
    assert proc.wait(timeout=300) == 1
    said = out.read_text()
    assert f"train job {job_id} CANCELLED" in said and "run the same command to resume" in said, said
    record = json.loads((folder / "job.json").read_text())
    attempt = record["attempts"][-1]
    assert record["state"] == "CANCELLED" and (attempt["step"], attempt["exit_reason"]) == (
        2,
        "stopped by SIGINT",
    )
    with pytest.raises(ProcessLookupError):  # no orphan keeps training
        os.kill(attempt["pid"], 0)
    run_dir = Path(record["run_dir"])
    assert (run_dir / "checkpoints" / "step-00000002" / "sdcluster-checkpoint.json").is_file()

    again, out = _start(tmp_path, cache_root, "")
    assert again.wait(timeout=300) == 0, out.read_text()
    job_id, folder = _job(tmp_path, out)
    assert f"resumed from {run_dir}/checkpoints/step-00000002" in (folder / f"{job_id}_0_log.out").read_text()


def test_ctrl_c_stops_the_job_with_a_checkpoint_even_if_sigint_was_inherited_ignored(
    tmp_path, cache_root, tiny_model
):
    """Started from a script's background job (SIGINT ignored), a SIGINT to the launcher still stops the
    job at a step with a checkpoint: the launcher installs its own handling while it waits."""
    proc, out = _start(tmp_path, cache_root, "step:2", sigint=signal.SIG_IGN)
    job_id, folder = _job(tmp_path, out)
    wait_for_line(folder / f"{job_id}_0_log.out", r"paused at step 2 ")
    os.kill(proc.pid, signal.SIGINT)  # the launcher alone: the job hears only what the launcher tells it
    assert proc.wait(timeout=300) == 1
    said = out.read_text()
    assert f"Ctrl-C: job {job_id} stops at its next step boundary" in said, said
    assert f"train job {job_id} CANCELLED" in said and "Traceback" not in said, said
    record = json.loads((folder / "job.json").read_text())
    attempt = record["attempts"][-1]
    assert (attempt["step"], attempt["exit_reason"]) == (2, "stopped by SIGTERM")
    run_dir = Path(record["run_dir"])
    assert (run_dir / "checkpoints" / "step-00000002" / "sdcluster-checkpoint.json").is_file()


def test_a_local_job_killed_without_a_word_is_shown_as_died(tmp_path, cache_root, tiny_model):
    proc, out = _start(tmp_path, cache_root, "step:1")
    job_id, folder = _job(tmp_path, out)
    wait_for_line(folder / f"{job_id}_0_log.out", r"paused at step 1 ")
    pid = json.loads((folder / "job.json").read_text())["attempts"][-1]["pid"]
    os.kill(pid, signal.SIGKILL)  # the OOM killer, a reboot: nothing is recorded
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert json.loads((folder / "job.json").read_text())["state"] == "RUNNING", "nothing could record it"
    shown = _logs(tmp_path, job_id)
    assert "RUNNING, but its process is gone" in shown, shown
    assert re.search(rf"^{job_id}\s+train\s+DIED", _logs(tmp_path), re.M)


def test_a_second_launch_of_a_live_run_is_refused_and_a_dead_holder_is_taken_over(
    tmp_path, cache_root, tiny_model
):
    first, out = _start(tmp_path, cache_root, "step:1")  # holds the run folder, paused
    job_id, folder = _job(tmp_path, out)
    wait_for_line(folder / f"{job_id}_0_log.out", r"paused at step 1 ")
    second, out2 = _start(tmp_path, cache_root, "")
    assert second.wait(timeout=120) == 2
    said = out2.read_text()
    assert f"is in use by job {job_id} (RUNNING)" in said and f"python -m sdcluster.logs {job_id}" in said
    assert "submitted" not in said, "refused before anything was queued"

    os.killpg(first.pid, signal.SIGKILL)  # the holder dies without a word
    first.wait(timeout=60)
    pid = json.loads((folder / "job.json").read_text())["attempts"][-1]["pid"]
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    third, out3 = _start(tmp_path, cache_root, "")
    assert third.wait(timeout=300) == 0, out3.read_text()
    new_id, _ = _job(tmp_path, out3)
    run_dir = Path(json.loads((folder / "job.json").read_text())["run_dir"])
    assert json.loads((run_dir / ".sdcluster-owner.json").read_text())["job_id"] == new_id, "taken over"
