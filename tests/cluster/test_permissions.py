"""Private by default: outputs follow the umask; job folders (pickles submitit loads) are the owner's."""

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
    return stat.S_IMODE(path.lstat().st_mode)


def modes_under(root: Path) -> dict[str, str]:
    """Octal mode of every file and folder below ``root`` (symlinks have none of their own)."""
    return {str(p.relative_to(root)): oct(_mode(p)) for p in sorted(root.rglob("*")) if not p.is_symlink()}


def expected_jobs_modes(found: dict[str, str], root: Path, share: bool) -> dict[str, str]:
    """What every entry of ``found`` must be: owner-writable only, group-readable iff shared."""
    folder, file = (0o750, 0o640) if share else (0o700, 0o600)
    return {rel: oct(folder if (root / rel).is_dir() else file) for rel in found}


def expected_output_modes(found: dict[str, str], root: Path, umask: int) -> dict[str, str]:
    return {rel: oct((0o777 if (root / rel).is_dir() else 0o666) & ~umask) for rel in found}


@pytest.mark.parametrize(("umask", "share"), [(0o002, True), (0o022, False), (0o077, True)])
def test_outputs_follow_the_umask_and_jobs_are_the_owners(tmp_path, cache_root, tiny_model, umask, share):
    args = [sys.executable, "-m", "sdcluster.launch", "debug=fast", "task=train", "train.max_steps=2"]
    args += [
        f"output_root={tmp_path / 'outputs'}",
        f"jobs_root={tmp_path / 'jobs'}",
        f"cache_root={cache_root}",
    ]
    args += ["+cluster=local", f"cluster.share_jobs_with_group={str(share).lower()}"]
    env = {**os.environ, "SDCLUSTER_HOME": str(tmp_path / "home")}
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=600, env=env, umask=umask)
    assert proc.returncode == 0, proc.stderr[-3000:]

    jobs = tmp_path / "jobs"
    assert oct(_mode(jobs)) == oct(0o750 if share else 0o700)
    found = modes_under(jobs)
    names = {Path(rel).name for rel in found}
    # the files a group member could otherwise rewrite to run code as the user are among those checked
    assert any(n.endswith("_submitted.pkl") for n in names) and any(n.endswith("_result.pkl") for n in names)
    assert {"job.json", "config.yaml"} <= names and any(n.endswith("_log.out") for n in names)
    assert found == expected_jobs_modes(found, jobs, share), (
        "jobs/: the owner's, the group's to read iff shared"
    )

    run = next((tmp_path / "outputs" / "runs").iterdir())
    written = modes_under(run)
    assert any(rel.endswith(".safetensors") for rel in written) and "model/model_index.json" in written
    assert written == expected_output_modes(written, run, umask), "every output follows the umask"
