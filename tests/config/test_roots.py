"""A ``%`` in a root is refused at composition: SLURM would expand it in the job's log paths (``%u``: the
user), the log folder it writes to would not exist and the job would die with "No output/error stream
produced" after queueing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sdcluster.config import ConfigError
from tests.conftest import REPO, compose


@pytest.mark.parametrize("key", ["jobs_root", "output_root", "cache_root"])
def test_a_percent_in_a_root_is_refused_naming_the_hydra_fix(key):
    with pytest.raises(ConfigError) as err:
        compose(["+cluster=slurm", f"{key}=/scratch/%u/sd"])
    message = str(err.value)
    assert message.startswith(f"{key}: '/scratch/%u/sd' contains '%'")
    assert message.endswith(
        f"Fix: write the path literally, or let Hydra fill it in: {key}='/scratch/${{oc.env:USER}}/sd'"
    )


def test_the_suggested_interpolation_composes_to_the_users_folder(monkeypatch):
    monkeypatch.setenv("USER", "alice")
    cfg = compose(["+cluster=slurm", "jobs_root=/scratch/${oc.env:USER}/jobs"])
    assert cfg.jobs_root == "/scratch/alice/jobs"


def test_launch_refuses_it_before_anything_is_written(tmp_path):
    args = [sys.executable, "-m", "sdcluster.launch", "+cluster=slurm", "task=train"]
    args += [f"jobs_root={tmp_path}/%u/jobs", f"output_root={tmp_path}/outputs"]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"sdcluster: configuration error: jobs_root: '{tmp_path}/%u/jobs' contains '%'" in proc.stderr
    assert not list(tmp_path.iterdir()), "nothing may be written (or queued) for a refused config"
