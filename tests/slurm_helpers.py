"""Helpers for tests that submit real jobs: launch from a "login node" subprocess, wait on sacct."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import REPO

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL"}
_SUBMITTED = re.compile(r"^submitted (\w+) job (\S+):", re.MULTILINE)


def launch(tmp: Path, cache_root: Path, *overrides: str, env: dict | None = None, timeout: int = 120):
    """Run ``python -m sdcluster.launch +cluster=slurm`` as a user does; return (process, {task: ids})."""
    args = [
        sys.executable,
        "-m",
        "sdcluster.launch",
        *[o for o in overrides if o.startswith("-")],  # Hydra's flags (-m) come before the overrides
        "+cluster=slurm",
        f"output_root={tmp / 'outputs'}",
        f"jobs_root={tmp / 'jobs'}",
        f"cache_root={cache_root}",
        "cluster.timeout_min=20",
        *[o for o in overrides if not o.startswith("-")],
    ]
    full_env = {**os.environ, "SDCLUSTER_HOME": str(tmp / "home"), **(env or {})}
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=timeout, env=full_env)
    ids: dict[str, list[str]] = {}
    for task, job_id in _SUBMITTED.findall(proc.stdout):
        ids.setdefault(task, []).append(job_id)
    return proc, ids


def _conf_env(slurm_conf: Path | None) -> dict[str, str] | None:
    return {**os.environ, "SLURM_CONF": str(slurm_conf)} if slurm_conf else None


def sacct_state(job_id: str, slurm_conf: Path | None = None) -> tuple[str, str]:
    """(state, exit code) from accounting; ``slurm_conf``: ask that cluster, not ``$SLURM_CONF``'s."""
    out = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State,ExitCode"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=_conf_env(slurm_conf),
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    if not lines:
        return "", ""
    state, _, code = lines[-1].partition("|")
    return state.split()[0], code


def wait_for(
    job_id: str, timeout_s: float = 300, states: set[str] = TERMINAL, slurm_conf: Path | None = None
) -> tuple[str, str]:
    """Poll the scheduler (a real condition, with a deadline) until the job reaches one of ``states``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state, code = sacct_state(job_id, slurm_conf)
        if state in states:
            return state, code
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not reach {sorted(states)} in {timeout_s}s (last: {state})")


def wait_for_line(path: Path, pattern: str, timeout_s: float = 300) -> str:
    """Poll a log file until a line matches ``pattern`` (the job has reached that point)."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                if regex.search(line):
                    return line
        time.sleep(0.5)
    raise AssertionError(f"{path} never printed /{pattern}/ in {timeout_s}s")


def job_record(tmp: Path, job_id: str) -> dict:
    return json.loads((tmp / "jobs" / job_id / "job.json").read_text())


def logs_cli(tmp: Path, *args: str, timeout: int = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SDCLUSTER_HOME": str(tmp / "home")}
    cmd = [sys.executable, "-m", "sdcluster.logs", "--jobs-root", str(tmp / "jobs"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout, env=env)


def wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> bool:
    """Poll ``condition()`` until true or the deadline; return whether it became true."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


_LIVE = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "SUSPENDED",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "RESIZING",
}


def live_jobs_under(root: Path, slurm_conf: Path) -> set[str]:
    """Ids of the jobs the scheduler still holds whose log files go under ``root`` (a test's folder).

    The log path, not the user (every test runs as root) nor the time: tests of other sessions may share
    the sandbox, and only this test's jobs write under its tmp folder. An array is named by its array id.
    """
    out = subprocess.run(
        ["scontrol", "show", "job", "--oneliner"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=_conf_env(slurm_conf),
    )
    found = set()
    for line in out.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        stdout = fields.get("StdOut", "")
        if fields.get("JobState") in _LIVE and stdout and Path(stdout).is_relative_to(root):
            found.add(fields.get("ArrayJobId") or fields["JobId"])
    return found


def cancel_jobs_under(root: Path, slurm_conf: Path, timeout_s: float = 60) -> set[str]:
    """``scancel`` every live job logging under ``root`` and wait (bounded) until the scheduler let them go,
    so the next test finds the node free. Returns the ids that were cancelled."""
    jobs = live_jobs_under(root, slurm_conf)
    if jobs:
        env = _conf_env(slurm_conf)
        subprocess.run(["scancel", *sorted(jobs)], capture_output=True, timeout=30, check=False, env=env)
        wait_until(lambda: not live_jobs_under(root, slurm_conf) & jobs, timeout_s)
    return jobs


node_held_alone = False
"""True while a ``slurm_serial`` test runs (tests/slurm_cluster.py): no other test has a job on the node."""


def preempt_node(tmp: Path, partition: str = "high") -> str:
    """Submit a job on ``partition`` that needs whole nodes (``--exclusive``): it can start only when every
    job of a preemptable partition on them has gone, so SLURM preempts them. Logs under ``tmp`` (the
    test's folder), so the test's cleanup cancels it whatever happens.

    Only from a ``slurm_serial`` test: another test's job on an unpreemptable partition would hold the
    node, and the preemptor would wait for it instead of preempting when the test means it to.
    """
    if not node_held_alone:
        raise AssertionError(
            "preempt_node needs the node to itself, but the test may share it with parallel workers' jobs. "
            "Fix: mark the test @pytest.mark.slurm_serial"
        )
    log = str(tmp / "preemptor-%j.out")
    out = subprocess.run(
        ["sbatch", "--parsable", "-p", partition, "--exclusive", "-o", log, "--wrap", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.strip().split(";")[0]


def sacct_history(job_id: str) -> list[str]:
    """Every state accounting holds for ``job_id``, one per run of it (``-D``: a requeued job's earlier
    runs too), oldest first."""
    out = subprocess.run(
        ["sacct", "-j", job_id, "-X", "-D", "-n", "-P", "-o", "State"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


PREEMPTIBLE_GENERATION = (
    "task=generate",
    "generate.num_images=12",
    "generate.batch_size=2",
    "generate.steps=4",
)
"""Six batches (with generate.model=the tiny model): long enough for a signal to land mid-way."""
