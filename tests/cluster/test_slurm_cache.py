"""The latent cache built as a SLURM array of two tasks, one preempted mid-piece and requeued, ahead of the
training job that waits on it (``data.cache_shards`` > 1 with a training task)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from sdcluster.data.latent_cache import CACHE_VERSION, verify
from tests.conftest import copy_sample
from tests.slurm_helpers import job_record, launch, wait_for, wait_for_line

pytestmark = pytest.mark.slurm


def test_a_cache_array_keeps_the_finished_piece_and_the_requeued_task_publishes(
    slurm_cluster, tmp_path, cache_root, tiny_model
):
    """Task 0 is held at its first batch and sent USR2 (what submitit requeues on); task 1 finishes its piece
    meanwhile. The requeued task 0 encodes its piece again, finds piece 1 done and publishes the entry. The
    training job launched with it waits on the whole array (afterok), then reads the entry as it is."""
    data = copy_sample(tmp_path / "data", 4, lambda row: {**row, "text": f"{row['text']} {tmp_path.name}"})
    run = ["task=train", f"data.path={data}", "data.cache_shards=2", "cluster.cpus_per_task=1"]
    run += ["train.max_steps=2", "train.validate_every=0", "train.validation_prompts=[]"]
    proc, ids = launch(tmp_path, cache_root, *run, env={"SDCLUSTER_TEST_PAUSE": "batch:1@0"})
    assert proc.returncode == 0, proc.stderr
    task0, task1 = ids["cache"]
    (train,) = ids["train"]
    log0 = tmp_path / "jobs" / task0 / f"{task0}_0_log.out"
    wait_for_line(log0, r"paused at batch 1 ")
    array = task0.split("_")[0]
    assert job_record(tmp_path, train)["after"] == array  # every task of the array, not one of them
    waiting = subprocess.run(["squeue", "-h", "-j", train, "-o", "%T %r"], capture_output=True, text=True)
    assert waiting.stdout.split() == ["PENDING", "Dependency"], waiting
    assert wait_for(task1)[0] == "COMPLETED"
    log1 = (tmp_path / "jobs" / task1 / f"{task1}_0_log.out").read_text()
    assert "piece 2 of 2 encoded" in log1 and "1 of 2 pieces done" in log1
    subprocess.run(["scancel", "--signal=USR2", task0], check=True, timeout=30)
    assert wait_for(task0)[0] == "COMPLETED"

    first, second = job_record(tmp_path, task0)["attempts"]
    assert (first["state"], first["requeued"]) == ("PREEMPTED", True)
    assert second["state"] == "COMPLETED"
    text = log0.read_text()
    assert "piece 1 stopped after" in text and "piece 1 of 2 encoded" in text
    published = text.split("every piece done; published ")[1].split()[0]
    entry = Path(published)
    assert verify(entry, entry.name, CACHE_VERSION) is None
    assert json.loads((entry / "manifest.json").read_text())["world_size"] == 2
    assert not list(entry.parent.glob(f".{entry.name}.pieces-*"))
    assert wait_for(train)[0] == "COMPLETED"
    trained = (tmp_path / "jobs" / train / f"{train}_0_log.out").read_text()
    assert f"latent cache: {entry} (" in trained and "encoding rows" not in trained
