"""Job ids are unique within one cluster only: the user's job index records the cluster of each id, and
``sdcluster logs ID`` picks the working directory's job, then the one of the cluster this machine reaches,
and lists both (with ``--cluster`` to choose) when it cannot tell.

The first tests write index lines and job folders as submission does (``records.index_job``), one of them
in the old two-column form; the last one submits to two real SLURM sandboxes of different ``ClusterName``
whose job ids collide.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sdcluster import logs, paths
from sdcluster.cluster import records
from tests import sandbox
from tests.conftest import REPO
from tests.slurm_helpers import launch


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty index, a working directory without ``jobs/``, and no SLURM controller to ask."""
    monkeypatch.setenv("SDCLUSTER_HOME", str(tmp_path / "home"))
    unreadable = tmp_path / "unreadable-slurm.conf"
    unreadable.write_text("")  # a config the clients refuse at once: no scheduler answers
    monkeypatch.setenv("SLURM_CONF", str(unreadable))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "home"


def _job(folder: Path, task: str, cluster: str | None, index: bool = True) -> Path:
    """A job folder as submission leaves it, indexed on ``cluster`` (None: as an earlier version did)."""
    records.update(folder, {"job_id": folder.name, "task": task, "cluster": "slurm", "state": "COMPLETED"})
    if index and cluster is None:  # the line sdcluster wrote before it recorded clusters
        with paths.job_index().open("a") as fh:
            fh.write(f"{folder.name}\t{folder.resolve()}\n")
    elif index:
        records.index_job(folder.name, folder, cluster)
    return folder


def _logs(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = logs.main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_old_index_lines_still_read(home, tmp_path, capsys):
    paths.job_index().parent.mkdir(parents=True)
    old = _job(tmp_path / "elsewhere" / "jobs" / "41", "train", cluster=None)
    _job(tmp_path / "elsewhere" / "jobs" / "42", "generate", cluster="blue")
    entries = {e.job_id: e for e in records.index_entries()}
    assert entries["41"] == records.Indexed("41", old.resolve(), None)
    assert entries["42"].cluster == "blue"
    code, out, _ = _logs("41", capsys=capsys)
    assert code == 0 and out.startswith("job 41: train on slurm"), out


def test_the_working_directory_wins_over_another_clusters_array(home, tmp_path, capsys):
    """The reported case: ``jobs/12`` here (a training job) and array 12_0/12_1 of another cluster in the
    index; ``logs 12`` showed the array."""
    _job(tmp_path / "jobs" / "12", "train", cluster="blue")
    for task in ("12_0", "12_1"):
        _job(tmp_path / "other" / "jobs" / task, "generate", cluster="green")
    code, out, _ = _logs("12", capsys=capsys)
    assert code == 0, out
    assert "job array 12:" not in out and "job 12: train on slurm" in out, out
    assert "also known on cluster green: job array of 2 tasks" in out, out
    assert "python -m sdcluster.logs --cluster green 12" in out, out
    code, out, _ = _logs("--cluster", "green", "12", capsys=capsys)
    assert code == 0 and "job array 12: 2 tasks" in out and "job 12_0: generate" in out, out


def test_an_id_on_two_clusters_none_of_them_here_is_listed_with_both(home, tmp_path, capsys):
    blue = _job(tmp_path / "a" / "jobs" / "7", "train", cluster="blue")
    green = _job(tmp_path / "b" / "jobs" / "7", "generate", cluster="green")
    legacy = _job(tmp_path / "c" / "jobs" / "7", "train", cluster=None)
    code, out, err = _logs("7", capsys=capsys)
    assert code == 2 and not out, out
    assert "job 7 is known on 3 clusters; choose one with --cluster NAME" in err, err
    assert f"cluster blue: train job, {blue.resolve()}" in err, err
    assert f"cluster green: generate job, {green.resolve()}" in err, err
    assert "python -m sdcluster.logs --cluster green 7" in err, err
    # a line without a cluster is chosen by its jobs root (what --jobs-root is for)
    assert f"python -m sdcluster.logs --jobs-root {legacy.resolve().parent} 7" in err, err
    code, out, _ = _logs("--cluster", "green", "7", capsys=capsys)
    assert code == 0 and "job 7: generate on slurm" in out and f"folder: {green.resolve()}" in out, out
    code, out, _ = _logs("--jobs-root", str(legacy.parent), "7", capsys=capsys)
    assert code == 0 and f"folder: {legacy}" in out, out
    code, _, err = _logs("--cluster", "red", "7", capsys=capsys)
    assert code == 2 and "no job 7 on cluster red" in err, err


def test_the_cluster_this_machine_reaches_is_preferred(home, tmp_path, capsys):
    """A local job is of ``local@<host>``: the local backend always answers for this machine."""
    _job(tmp_path / "a" / "jobs" / "9", "generate", cluster="green")
    mine = _job(tmp_path / "b" / "jobs" / "9", "train", cluster=f"local@{socket.gethostname()}")
    code, out, _ = _logs("9", capsys=capsys)
    assert code == 0 and f"folder: {mine.resolve()}" in out, out
    assert "(job 9 is also known on cluster green: generate job" in out, out


def test_the_listing_names_clusters_when_there_are_several(home, tmp_path, capsys):
    _job(tmp_path / "a" / "jobs" / "5", "train", cluster="blue")
    _job(tmp_path / "b" / "jobs" / "5", "generate", cluster="green")
    code, out, _ = _logs(capsys=capsys)
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == ["5"]]
    assert code == 0 and sorted((r[1], r[-1]) for r in rows) == [("generate", "green"), ("train", "blue")]


def _unreadable(tmp: Path) -> Path:
    """A SLURM config the clients refuse at once (a missing one sends them to DNS for a minute)."""
    (tmp / "unreadable-slurm.conf").write_text("")
    return tmp / "unreadable-slurm.conf"


def _logs_cli(cwd: Path, home: Path, slurm_conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SDCLUSTER_HOME": str(home), "SLURM_CONF": str(slurm_conf)}
    cmd = [sys.executable, "-m", "sdcluster.logs", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=120, env=env)


@pytest.mark.slurm
def test_the_same_id_on_two_real_clusters(slurm_cluster, tmp_path, cache_root, tiny_model):
    """A training job on the suite's sandbox (ClusterName sdcluster) gets id X; a second sandbox
    (sdcluster-b) starts its ids at X, and a two-point sweep there is array X. Both held, so nothing runs
    and the scheduler's word (PENDING) shows which cluster was asked."""
    home, hold = tmp_path / "home", "+cluster.additional_parameters.hold=true"
    proc, ids = launch(tmp_path / "a", cache_root, "task=train", hold, env={"SDCLUSTER_HOME": str(home)})
    assert proc.returncode == 0 and len(ids["train"]) == 1, proc.stderr
    job_id = ids["train"][0]
    second_dir = tmp_path / "cluster-b"
    try:
        second = sandbox.start(second_dir, cluster="sdcluster-b", first_job_id=int(job_id))
        env = {"SDCLUSTER_HOME": str(home), "SLURM_CONF": str(second.slurm_conf)}
        proc, ids = launch(
            tmp_path / "b", cache_root, "-m", "task=train", "optim.lr=1e-4,5e-5", hold, env=env
        )
        assert proc.returncode == 0 and ids["train"] == [f"{job_id}_0", f"{job_id}_1"], (
            proc.stdout + proc.stderr
        )
        index = (home / "jobs.tsv").read_text()
        assert f"{job_id}\t{(tmp_path / 'a' / 'jobs' / job_id).resolve()}\tsdcluster\n" in index, index
        assert f"{job_id}_1\t{(tmp_path / 'b' / 'jobs' / f'{job_id}_1').resolve()}\tsdcluster-b\n" in index

        # the working directory's jobs/ first, whatever cluster is reachable; the other cluster's
        # scheduler is not asked about it (there the id names the array)
        here = _logs_cli(tmp_path / "a", home, second.slurm_conf, job_id)
        assert here.returncode == 0 and f"job {job_id}: train on slurm" in here.stdout, here
        assert f"job array {job_id}:" not in here.stdout and "scheduler state" not in here.stdout, here.stdout
        assert f"--cluster sdcluster-b {job_id})" in here.stdout, here.stdout
        # elsewhere, the cluster SLURM_CONF reaches
        on_a = _logs_cli(tmp_path, home, slurm_cluster.slurm_conf, job_id)
        assert f"job {job_id}: train on slurm" in on_a.stdout and "scheduler state: PENDING" in on_a.stdout
        on_b = _logs_cli(tmp_path, home, second.slurm_conf, job_id)
        assert f"job array {job_id}: 2 tasks" in on_b.stdout, on_b
        assert re.search(rf"^  {job_id}_1 +train +PENDING$", on_b.stdout, re.MULTILINE), on_b.stdout
        # no scheduler answers: both, and how to choose
        neither = _logs_cli(tmp_path, home, _unreadable(tmp_path), job_id)
        assert neither.returncode == 2 and "choose one with --cluster NAME" in neither.stderr, neither
        assert "cluster sdcluster: train job" in neither.stderr, neither.stderr
        assert "cluster sdcluster-b: job array of 2 tasks" in neither.stderr, neither.stderr
        chosen = _logs_cli(tmp_path, home, _unreadable(tmp_path), "--cluster", "sdcluster-b", job_id)
        assert chosen.returncode == 0 and f"job array {job_id}: 2 tasks" in chosen.stdout, chosen
        script = subprocess.run(
            [sys.executable, "-m", "sdcluster", "logs", "--cluster", "sdcluster", job_id],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
            env={**os.environ, "SDCLUSTER_HOME": str(home), "SLURM_CONF": str(_unreadable(tmp_path))},
        )
        assert f"job {job_id}: train on slurm" in script.stdout, script
    finally:  # its daemons must not outlive the test (the suite's own sandbox stays up for the next)
        sandbox.stop(second_dir)
