"""``python -m sdcluster.models fetch`` composes its config below the entry point: the same config a launch
builds, without importing :mod:`sdcluster.launch`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PROBE = """
import sys
from sdcluster.models.__main__ import main
code = main(sys.argv[1:])
print("exit", code, "launch imported:", "sdcluster.launch" in sys.modules)
"""


def _fetch(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", PROBE, "fetch", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_fetch_composes_without_the_launch_entry_point_and_explains_a_local_model(tmp_path):
    """From a directory without conf/ (Hydra's search path for conf/local/ finds nothing, quietly)."""
    done = _fetch(tmp_path, "model=tiny")
    assert done.stdout.strip() == "exit 2 launch imported: False", done.stdout + done.stderr
    assert done.stderr.strip() == (
        "sdcluster: configuration error: model.path: 'tiny' is not a hub model (it is built or read "
        "locally): nothing to fetch. Fix: give a hub id such as CompVis/stable-diffusion-v1-4, or model=sd14"
    )
