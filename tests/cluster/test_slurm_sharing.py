"""Parallel workers share the sandbox's one node: it has room for their jobs side by side, a
``slurm_serial`` test has it to itself, and a sandbox that older code started is restarted, not reused.

The lock is tested on its files with non-blocking probes (what another worker would get), the node with
real jobs that hold until the test lets them go.
"""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
import threading
from pathlib import Path

import pytest

from tests import slurm_helpers
from tests.sandbox import layout
from tests.sandbox.configs import write_configs
from tests.sandbox.lifecycle import _conf_is_current
from tests.slurm_cluster import _node_held
from tests.slurm_helpers import wait_for, wait_until


def _would_get(path: Path, how: int) -> bool:
    """Whether another process asking ``how`` (LOCK_SH or LOCK_EX) on ``path`` would get it now."""
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, how | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    return True


def test_a_test_alone_on_the_node_waits_for_the_others_and_holds_off_new_ones(tmp_path):
    users, gate = tmp_path / ".node-users", tmp_path / ".node-gate"
    with contextlib.ExitStack() as first:
        first.enter_context(_node_held(tmp_path, alone=False))
        assert _would_get(users, fcntl.LOCK_SH), "shared holders run side by side"
        assert not _would_get(users, fcntl.LOCK_EX)

        entered, leave = threading.Event(), threading.Event()

        def alone() -> None:
            with _node_held(tmp_path, alone=True):
                entered.set()
                leave.wait()

        waiter = threading.Thread(target=alone, daemon=True)
        waiter.start()
        # it waits for the shared holder, and meanwhile no new test gets in (the gate is closed)
        assert wait_until(lambda: not _would_get(gate, fcntl.LOCK_SH), timeout_s=30)
        assert not entered.is_set()
    assert wait_until(entered.is_set, timeout_s=30), "the last shared holder left: it must get the node"
    assert not _would_get(users, fcntl.LOCK_SH)
    leave.set()
    waiter.join(timeout=30)
    assert _would_get(users, fcntl.LOCK_EX) and _would_get(gate, fcntl.LOCK_EX), "released at the end"


def test_preempt_node_is_refused_outside_a_serial_test(tmp_path):
    assert not slurm_helpers.node_held_alone
    with pytest.raises(AssertionError, match=r"needs the node to itself.*Fix: mark the test .*slurm_serial"):
        slurm_helpers.preempt_node(tmp_path)
    assert not list(tmp_path.iterdir()), "nothing was submitted"


def test_a_sandbox_started_by_other_code_is_not_current(tmp_path):
    lay = layout.layout(1)
    write_configs(tmp_path, lay, "secret")
    assert _conf_is_current(tmp_path, lay)
    conf = tmp_path / "slurm.conf"
    conf.write_text(conf.read_text().replace(f" CPUs={lay.nodes[0].cpus} ", " CPUs=1 "))
    assert not _conf_is_current(tmp_path, lay), "a node declared otherwise: restart, do not reuse"
    conf.unlink()
    assert not _conf_is_current(tmp_path, lay)


@pytest.mark.slurm_serial  # counts on the node's CPUs being free
def test_jobs_of_parallel_workers_run_side_by_side_on_the_node(slurm_cluster, tmp_path):
    """As many 2-CPU jobs at once as ``SINGLE_NODE_MIN_CPUS`` allows, whatever CPUs the machine has."""
    go = tmp_path / "go"
    hold = f"touch {tmp_path}/started-$SLURM_JOB_ID; while [ ! -e {go} ]; do sleep 0.2; done"
    jobs = []
    for k in range(layout.SINGLE_NODE_MIN_CPUS // 2):
        argv = ["sbatch", "--parsable", "-n", "2", "-o", str(tmp_path / f"job{k}.out"), "--wrap", hold]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
        jobs.append(out.stdout.strip())

    def started() -> int:
        return len(list(tmp_path.glob("started-*")))

    try:
        assert wait_until(lambda: started() == len(jobs), timeout_s=120), f"{started()} of {len(jobs)} ran"
    finally:
        go.touch()
    assert [wait_for(job)[0] for job in jobs] == ["COMPLETED"] * len(jobs)
