"""Status at a glance: ``sdcluster logs`` without an id and ``sdcluster sweep list``, on real job folders."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sdcluster.paths import RunPaths
from sdcluster.train import metrics
from tests.conftest import REPO
from tests.slurm_helpers import wait_for_line
from tests.test_cli import ENTRIES


def _cli(tmp: Path, *args: str, entry: str = "script") -> subprocess.CompletedProcess[str]:
    """A command run from a directory with no jobs/ of its own: what it lists comes from the index."""
    env = {**os.environ, "SDCLUSTER_HOME": str(tmp / "home")}
    cmd = [*ENTRIES[entry], *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=120, env=env)


def test_no_jobs_and_no_sweeps_say_what_to_do(tmp_path):
    for entry in ENTRIES:
        shown = _cli(tmp_path, "logs", entry=entry)
        assert shown.returncode == 0 and shown.stdout.startswith("no jobs yet: run `sdcluster launch`"), shown
    listed = _cli(tmp_path, "sweep", "list")
    assert listed.returncode == 0 and listed.stdout.startswith("no sweeps yet: run `sdcluster launch -m"), (
        listed
    )


def _row(text: str, job_id: str) -> list[str]:
    line = next((ln for ln in text.splitlines() if ln.split()[:1] == [job_id]), None)
    assert line, f"no row for job {job_id} in\n{text}"
    return line.split()


@pytest.mark.slow
def test_a_running_then_stopped_local_job_at_a_glance(tmp_path, cache_root, tiny_model):
    """A job held at step 2 (the test pause) is RUNNING with 2/6, its loss, an ETA and this host; stopped
    with Ctrl-C it is CANCELLED and has no ETA."""
    out = tmp_path / "launch.out"
    args = ["debug=fast", "task=train", "train.max_steps=6", "train.checkpoint_every=100"]
    args += [f"{key}={tmp_path / key}" for key in ("output_root", "jobs_root")] + [f"cache_root={cache_root}"]
    env = {**os.environ, "SDCLUSTER_HOME": str(tmp_path / "home"), "SDCLUSTER_TEST_PAUSE": "step:2"}
    with out.open("w") as fh:
        proc = subprocess.Popen(
            [*ENTRIES["script"], "launch", *args],
            cwd=REPO,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        job_id = re.search(r"submitted train job (\S+):", wait_for_line(out, r"submitted train job")).group(1)
        folder = tmp_path / "jobs_root" / job_id
        wait_for_line(folder / f"{job_id}_0_log.out", r"paused at step 2 ")
        running = _cli(tmp_path, "logs")
        assert running.returncode == 0, running.stderr
        record = json.loads((folder / "job.json").read_text())
        train, _ = metrics.read(RunPaths(Path(record["run_dir"])).metrics)
        _, task, state, progress, loss, eta, where = _row(running.stdout, job_id)[:7]
        assert (task, state, progress, where) == ("train", "RUNNING", "2/6", socket.gethostname())
        assert loss == f"{train[-1][1]:.4f}" and re.fullmatch(r"[\dhms]+", eta), running.stdout
        assert "progress" in running.stdout.splitlines()[1] and "eta" in running.stdout.splitlines()[1]
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the job saves and stops at a step
        assert proc.wait(timeout=300) == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for entry in ENTRIES:
        stopped = _cli(tmp_path, "logs", entry=entry)
        assert _row(stopped.stdout, job_id)[2:6] == ["CANCELLED", "2/6", loss, "-"], stopped.stdout
    module = subprocess.run(
        [sys.executable, "-m", "sdcluster.logs"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        env={**os.environ, "SDCLUSTER_HOME": str(tmp_path / "home")},
    )
    assert module.stdout == stopped.stdout, "python -m sdcluster.logs and sdcluster logs are one command"


@pytest.mark.slurm
def test_a_sweep_on_slurm_at_a_glance(slurm_cluster, tmp_path, cache_root, tiny_model):
    """Two points, one array: ``sweep list`` shows both COMPLETED with the best validation loss of the runs'
    own metrics, ``logs`` shows each job with the node SLURM ran it on, and the sweep below them."""
    from tests.slurm_helpers import launch, wait_for

    train = ["task=train", "train.max_steps=2", "train.log_every=1", "train.checkpoint_every=100"]
    proc, ids = launch(tmp_path, cache_root, "-m", *train, "optim.lr=1e-4,5e-5")
    assert proc.returncode == 0, proc.stderr
    assert all(wait_for(job_id)[0] == "COMPLETED" for job_id in ids["train"])
    folder = Path(re.search(r"-> (\S+)", proc.stdout).group(1))
    best = min(
        val
        for point in json.loads((folder / "sweep.json").read_text())["points"]
        for _, val in metrics.read(RunPaths(Path(point["run_dir"])).metrics)[1]
    )
    listed = _cli(tmp_path, "sweep", "list")
    row = next(ln for ln in listed.stdout.splitlines() if ln.startswith(folder.name))
    assert re.search(rf"\btrain\b.*\s2\s+2 COMPLETED\s+{best:.4f} \(point \d: optim.lr=", row), listed.stdout
    shown = _cli(tmp_path, "logs").stdout
    nodes = {
        subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "NodeList"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        for job_id in ids["train"]
    }
    for job_id in ids["train"]:
        _, task, state, progress = _row(shown, job_id)[:4]
        assert (task, state, progress) == ("train", "COMPLETED", "2/2") and _row(shown, job_id)[6] in nodes
    assert "sweeps" in shown and folder.name in shown.split("sweeps", 1)[1]
