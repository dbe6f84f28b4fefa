"""Pytest plugin: the real SLURM clusters that `slurm` tests submit to.

Registered from tests/conftest.py (``pytest_plugins = ["tests.slurm_cluster"]``) or with
``-p tests.slurm_cluster``. The single-node cluster (``slurm_cluster``) is started once per session (or
reused from an earlier session, < 2 s) and left running afterwards, so the next run does not pay the ~5 s
cold start again. The two-node cluster (``slurm_two_nodes``) is started only by the tests that ask for it
and taken down at the end of the session: its network namespaces, veth pairs, bridge and /etc/hosts lines
are machine-wide state that must not outlive the suite.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import sandbox
from tests.slurm_helpers import cancel_jobs_under

REPO = Path(__file__).resolve().parents[1]
_CLUSTERS = ("slurm_cluster", "_two_node_sandbox")  # the fixtures whose clusters a test can submit to


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
    """Two nodes n1, n2, one network namespace each; removed (daemons, namespaces, bridge) at session end.

    ``start`` first removes whatever a crashed earlier session left, and the finalizer runs also when a
    test failed. State dir: ``/tmp/sdcluster-slurm-2n`` (``$SDCLUSTER_SLURM_DIR`` + ``-2n``).
    """
    info = None
    try:
        info = _up_or_fail(2)
        yield info
    finally:
        sandbox.stop(info.state_dir if info else None, nodes=2)


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
