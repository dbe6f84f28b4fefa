"""Pytest plugin: the real single-node SLURM cluster that `slurm` tests submit to.

Registered from tests/conftest.py (``pytest_plugins = ["tests.slurm_cluster"]``) or with
``-p tests.slurm_cluster``. The cluster is started once per session (or reused from an earlier session,
< 2 s) and left running afterwards, so the next run does not pay the ~5 s cold start again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from sdcluster.cluster import sandbox

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[sandbox.SandboxInfo]:
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
