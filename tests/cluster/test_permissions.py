"""Private by default: files follow the user's umask, job folders (pickles submitit loads) are the owner's."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("umask", "share", "jobs_mode"),
    [(0o077, "false", 0o700), (0o027, "true", 0o750), (0o022, "false", 0o700)],
)
def test_umask_is_followed_and_jobs_are_the_owners(tmp_path, cache_root, tiny_model, umask, share, jobs_mode):
    args = [sys.executable, "-m", "sdcluster.launch", "debug=fast", "task=train", "train.max_steps=2"]
    args += [
        f"output_root={tmp_path / 'outputs'}",
        f"jobs_root={tmp_path / 'jobs'}",
        f"cache_root={cache_root}",
    ]
    args += ["+cluster=local", f"cluster.share_jobs_with_group={share}"]
    env = {**os.environ, "SDCLUSTER_HOME": str(tmp_path / "home")}
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=600, env=env, umask=umask)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _mode(tmp_path / "jobs") == jobs_mode
    run = next((tmp_path / "outputs" / "runs").iterdir())
    written = [
        run / "config.yaml",
        run / "metrics.jsonl",
        run / "checkpoints" / "latest",
        run / "checkpoints" / "step-00000002" / "sdcluster-checkpoint.json",
        run / "model" / "model_index.json",
        next((tmp_path / "jobs").glob("*/job.json")),
    ]
    files, folders = oct(0o666 & ~umask), oct(0o777 & ~umask)
    assert {p.name: oct(_mode(p)) for p in written} == {p.name: files for p in written}, (
        "files follow the umask"
    )
    published = [run / "model", run / "checkpoints" / "step-00000002", run / "model" / "unet"]
    assert {p.name: oct(_mode(p)) for p in published} == {p.name: folders for p in published}
