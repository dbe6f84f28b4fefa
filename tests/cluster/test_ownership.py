"""The in-job half of one writer per folder: ``ownership.enter`` as the job calls it when it starts.

The login-node half is tested through real launches (test_local_jobs, test_slurm_jobs); two launches can
race past it, and then only this check stands between two jobs writing one run folder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sdcluster.runtime import ownership


def _hold(folder: Path, job_id: str, jobs_folder: Path) -> dict:
    """A local holder as a launch records it (a local job's id is its controller's pid)."""
    ownership.claim(folder, job_id, "local", jobs_folder)
    return json.loads((folder / ownership.OWNER).read_text())


def _gone_pid() -> str:
    """The pid of a process that has ended (reaped), so ``kill(pid, 0)`` finds nothing."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return str(proc.pid)


def test_a_second_job_stops_before_writing_while_a_live_job_holds_the_folder(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = _hold(run, str(os.getpid()), tmp_path / "jobs" / "a")  # this test's process: alive
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(RuntimeError, match=rf"in use by job {os.getpid()}: this job stops before writing"):
        ownership.enter(run, "4242", "local", tmp_path / "jobs" / "b")
    assert json.loads((run / ownership.OWNER).read_text()) == holder  # the holder is kept
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written


def test_the_holder_re_enters_and_a_dead_holder_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _hold(run, str(os.getpid()), tmp_path / "jobs" / "a")
    ownership.enter(run, str(os.getpid()), "local", tmp_path / "jobs" / "a")  # a requeued attempt of it
    assert ownership.read_holder(run)["job_id"] == str(os.getpid())

    dead = _gone_pid()
    _hold(run, dead, tmp_path / "jobs" / "dead")
    ownership.enter(run, "4242", "local", tmp_path / "jobs" / "b")
    taken = ownership.read_holder(run)
    assert (taken["job_id"], taken["jobs_folder"], taken["host"]) == (
        "4242",
        str(tmp_path / "jobs" / "b"),
        socket.gethostname(),
    )


def test_tasks_of_one_array_share_a_generation_folder_but_a_sweep_point_does_not(tmp_path: Path) -> None:
    shards = tmp_path / "images"
    ownership.claim(shards, f"{os.getpid()}_0", "local", tmp_path / "jobs", whole_array=True)
    ownership.enter(shards, f"{os.getpid()}_1", "local", tmp_path / "jobs", whole_array=True)
    assert ownership.read_holder(shards)["job_id"] == str(os.getpid())

    point = tmp_path / "point"
    ownership.claim(point, str(os.getpid()), "local", tmp_path / "jobs")
    with pytest.raises(RuntimeError, match="in use by job"):
        ownership.enter(point, f"{os.getpid()}_1", "local", tmp_path / "jobs")
