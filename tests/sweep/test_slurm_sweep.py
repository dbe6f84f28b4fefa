"""Sweeps and generation arrays on the real cluster: one array, a ledger, a report that matches the logs."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.slurm_helpers import launch, wait_for, wait_for_line

pytestmark = pytest.mark.slurm

TRAIN = ["task=train", "train.max_steps=4", "train.log_every=1", "train.checkpoint_every=100"]


def _sweep_cli(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SDCLUSTER_HOME": str(tmp / "home")}
    cmd = [sys.executable, "-m", "sdcluster.sweep", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, env=env)


def test_lr_sweep_is_one_array_with_a_report_and_resubmit(slurm_cluster, tmp_path, cache_root, tiny_model):
    pause = {"SDCLUSTER_TEST_PAUSE": "step:2@1"}  # point 1 holds at step 2: the cancel always lands mid-run
    proc, ids = launch(tmp_path, cache_root, "-m", *TRAIN, "optim.lr=1e-4,5e-5,1e-5", env=pause)
    assert proc.returncode == 0, proc.stderr
    array = ids["train"]
    assert len(array) == 3 and len({j.split("_")[0] for j in array}) == 1, "one job array"
    assert [j.split("_")[1] for j in array] == ["0", "1", "2"]
    wait_for_line(tmp_path / "jobs" / array[1] / f"{array[1]}_0_log.out", r"paused at step 2 ")
    subprocess.run(["scancel", array[1]], check=True, timeout=30)  # a point that dies
    folder = Path(re.search(r"-> (\S+)", proc.stdout).group(1))
    record = json.loads((folder / "sweep.json").read_text())
    assert record["swept"] == ["optim.lr"] and len({p["run_dir"] for p in record["points"]}) == 3

    states = {j: wait_for(j)[0] for j in array}
    assert states[array[1]] == "CANCELLED" and states[array[0]] == states[array[2]] == "COMPLETED"
    again = _sweep_cli(tmp_path, "resubmit", str(folder), "--failed")
    assert again.returncode == 0, again.stderr
    (new_id,) = re.findall(r"point 1 .*resubmitted as (\S+)", again.stdout)
    assert wait_for(new_id)[0] == "COMPLETED"
    assert json.loads((folder / "sweep.json").read_text())["points"][1]["history"] == [[array[1]]]

    array_id = array[0].split("_")[0]
    listing = subprocess.run(
        [sys.executable, "-m", "sdcluster.logs", "--jobs-root", str(tmp_path / "jobs"), array_id],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, "SDCLUSTER_HOME": str(tmp_path / "home")},
    )
    assert f"job array {array_id}: 3 tasks" in listing.stdout, listing.stdout + listing.stderr
    assert re.search(rf"{array[1]}\s+train\s+CANCELLED", listing.stdout)
    assert _sweep_cli(tmp_path, "report", array_id).returncode == 0, "the array id as submission printed it"
    shown = _sweep_cli(tmp_path, "report", array[0])  # found from any of its job ids
    assert shown.returncode == 0, shown.stderr
    rows = list(csv.DictReader((folder / "report.csv").open()))
    assert [r["values"] for r in rows] == ["optim.lr=0.0001", "optim.lr=5e-05", "optim.lr=1e-05"]
    for row, point in zip(rows, record["points"], strict=True):
        job = point["jobs"][0] if row["point"] != "1" else new_id
        assert row["job_id"] == job and row["state"] == "COMPLETED" and row["steps"] == "4"
        # Point 1 was cancelled at step 2: its step 4 is in its resubmitted job's log.
        logs = (tmp_path / "jobs" / job / f"{job}_0_log.out").read_text()
        logged = re.findall(r"step 4/4 \| loss ([\d.]+)", logs)[-1]
        assert f"{float(row['last_loss']):.4f}" == logged, "report must match the run's own log"
    assert "best: point" in shown.stdout
    assert (folder / "report.png").stat().st_size > 1000


def test_bad_sweep_point_stops_everything_before_queueing(slurm_cluster, tmp_path, cache_root):
    proc, ids = launch(tmp_path, cache_root, "-m", *TRAIN, "cluster.partition=debug,nosuch")
    assert proc.returncode == 2 and not ids
    assert "cluster.partition: 'nosuch'" in proc.stderr
    assert not (tmp_path / "jobs").exists()

    proc, ids = launch(tmp_path, cache_root, "-m", *TRAIN, "train.log_every=5,10")
    assert proc.returncode == 2 and not ids
    assert "would train the same folder at once" in proc.stderr
    assert not (tmp_path / "jobs").exists() and not (tmp_path / "outputs" / "sweeps").exists()


def test_three_shards_equal_one_shard_byte_for_byte(slurm_cluster, tmp_path, cache_root, tiny_model):
    gen = [
        "task=generate",
        f"generate.model={tiny_model}",
        "generate.num_images=3",
        "generate.batch_size=2",
        "generate.steps=3",
    ]
    proc, ids = launch(tmp_path / "k3", cache_root, *gen, "generate.shards=3")
    assert proc.returncode == 0, proc.stderr
    assert len(ids["generate"]) == 3
    proc, one = launch(tmp_path / "k1", cache_root, *gen)
    assert proc.returncode == 0, proc.stderr
    for job in ids["generate"] + one["generate"]:
        assert wait_for(job)[0] == "COMPLETED"
    (three,) = list((tmp_path / "k3" / "outputs" / "generate").iterdir())
    (single,) = list((tmp_path / "k1" / "outputs" / "generate").iterdir())
    pngs = sorted(p.name for p in single.glob("p*-i*.png"))
    assert len(pngs) == 6 and sorted(p.name for p in three.glob("p*-i*.png")) == pngs
    for name in pngs:
        assert (three / name).read_bytes() == (single / name).read_bytes(), name
    manifest = [json.loads(ln)["file"] for ln in (three / "manifest.jsonl").read_text().splitlines()]
    assert manifest == pngs
    assert (three / "contact_sheet.png").is_file()
