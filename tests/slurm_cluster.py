"""Pytest plugin: the real SLURM clusters that `slurm` tests submit to.

Registered from tests/conftest.py (``pytest_plugins = ["tests.slurm_cluster"]``) or with
``-p tests.slurm_cluster``. The single-node cluster (``slurm_cluster``) is started by the first process
that needs it (or reused from an earlier session, < 2 s; ``sandbox.start`` serialises concurrent starts on
a file lock, so parallel workers start it once) and left running afterwards: the next run does not pay the
~5 s cold start again, and other sessions submitting to it at the same time keep it. The two-node cluster
(``slurm_two_nodes``) is started only by the tests that ask for it and taken down when the last process
using it ends its session: its network namespaces, veth pairs, bridge and /etc/hosts lines are
machine-wide state that must not outlive the suite.

Parallel workers (``pytest -n``) share the single node. Every test on it (``slurm_cluster``) holds it
shared, a ``slurm_serial`` test holds it alone (``_node_held``): its jobs see no other test's job on the
node, as a preemptor that needs the whole node must.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import sandbox, slurm_helpers
from tests.slurm_helpers import cancel_jobs_under

REPO = Path(__file__).resolve().parents[1]
_CLUSTERS = ("slurm_cluster", "_two_node_sandbox")  # the fixtures whose clusters a test can submit to


@contextlib.contextmanager
def _node_held(state_dir: Path, alone: bool) -> Iterator[None]:
    """Hold the sandbox's node shared (``alone=False``) or alone, across processes, until the block ends.

    flock on ``.node-users`` (shared or exclusive) behind a gate: a test that waits to hold the node alone
    holds the gate, so no new test starts on the node meanwhile (flock alone would let a stream of shared
    holders from other workers starve it). Tests only take the gate on their way in, so nothing waits in
    a cycle.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".node-gate", "a") as gate, open(state_dir / ".node-users", "a") as users:
        fcntl.flock(gate, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        fcntl.flock(users, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(gate, fcntl.LOCK_UN)
        yield  # closing the files releases both locks, also when the test failed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Around the setup, call and teardown of a test on the single-node cluster: hold its node (alone for
    ``slurm_serial``). Tests only on the two-node sandbox leave it be: they need not wait for a serial one."""
    alone = item.get_closest_marker("slurm_serial") is not None
    if not alone and "slurm_cluster" not in getattr(item, "fixturenames", ()):
        return (yield)
    with _node_held(sandbox.resolve_dir(), alone):
        slurm_helpers.node_held_alone = alone
        try:
            return (yield)
        finally:
            slurm_helpers.node_held_alone = False


@pytest.fixture(autouse=True)
def _cancel_the_tests_jobs(request: pytest.FixtureRequest) -> Iterator[None]:
    """After a test that used a cluster, pass or fail, cancel every job it left in the queue.

    One failing test must not fail the next ones: a job left paused or running holds the sandbox's only
    node, and the tests after it would time out waiting. Its jobs are those logging under its tmp folder.
    """
    yield
    tmp = request.node.funcargs.get("tmp_path") if hasattr(request.node, "funcargs") else None
    for name in _CLUSTERS:
        info = request.node.funcargs.get(name) if tmp is not None else None
        if info is not None:
            left = cancel_jobs_under(tmp, info.slurm_conf)
            if left:
                print(f"cancelled job(s) {sorted(left)} left by {request.node.nodeid}")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sandbox.SandboxInfo]:
    """Start (or reuse) the sandbox and point this process and its children at it.

    Missing packages make the test fail, not skip: a skipped `slurm` test would look like coverage it is
    not. State dir: ``$SDCLUSTER_SLURM_DIR`` or /tmp/sdcluster-slurm.
    """
    if os.geteuid() != 0:
        pytest.fail("the SLURM sandbox needs root (slurmd starts jobs as their user)", pytrace=False)
    try:
        info, problem = sandbox.start(), ""
    except sandbox.SandboxError as err:
        info, problem = None, str(err)
    if info is None:  # failed outside the except block, so pytest does not print the message twice
        pytest.fail(f"SLURM sandbox did not come up:\n{problem}", pytrace=False)
    with pytest.MonkeyPatch.context() as mp:
        # os.environ, not a fixture-local env: sbatch, sacct and submitit's own subprocesses inherit it,
        # and submitted jobs inherit it from sbatch (jobs call srun/scontrol inside, e.g. to requeue).
        mp.setenv("SLURM_CONF", str(info.slurm_conf))
        # Jobs unpickle functions defined in tests/ by module name; make that import work from any cwd.
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        yield info
    # The jobs of module fixtures (outside any test's tmp folder): the sandbox stays up for the next session.
    cancel_jobs_under(tmp_path_factory.getbasetemp(), info.slurm_conf)


def _up_or_fail(nodes: int) -> sandbox.SandboxInfo:
    if os.geteuid() != 0:
        pytest.fail("the SLURM sandbox needs root (slurmd starts jobs as their user)", pytrace=False)
    try:
        info, problem = sandbox.start(nodes=nodes), ""
    except sandbox.SandboxError as err:
        info, problem = None, str(err)
    if info is None:  # failed outside the except block, so pytest does not print the message twice
        pytest.fail(f"{nodes}-node SLURM sandbox did not come up:\n{problem}", pytrace=False)
    return info


@pytest.fixture(scope="session")
def _two_node_sandbox() -> Iterator[sandbox.SandboxInfo]:
    """Two nodes n1, n2, one network namespace each; removed (daemons, namespaces, bridge) at session end
    by the last process that used it.

    ``start`` first removes whatever a crashed earlier session left, and the finalizer runs also when a
    test failed. State dir: ``/tmp/sdcluster-slurm-2n`` (``$SDCLUSTER_SLURM_DIR`` + ``-2n``). Each process
    using it holds ``.users`` shared; at its end it stops the sandbox only if it can then hold that file
    alone, so another session still on it keeps it.
    """
    d = sandbox.resolve_dir(None, 2)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".users", "a") as users:
        fcntl.flock(users, fcntl.LOCK_SH)
        try:
            yield _up_or_fail(2)
        finally:
            fcntl.flock(users, fcntl.LOCK_UN)
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another process still uses it; the last one stops it
            else:
                sandbox.stop(d, nodes=2)


@pytest.fixture
def slurm_two_nodes(_two_node_sandbox: sandbox.SandboxInfo) -> Iterator[sandbox.SandboxInfo]:
    """Point this process and its children at the two-node cluster for one test.

    Per test, not per session: the single-node ``slurm_cluster`` exports its own ``SLURM_CONF`` for the
    whole session, and the tests after this one must find that one again.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", str(_two_node_sandbox.slurm_conf))
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        yield _two_node_sandbox
