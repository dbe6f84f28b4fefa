"""Real preemption and time limits: USR2 from scancel or SLURM's own warning, requeue, exact resume."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdcluster.train import step_folders
from tests.conftest import tensorboard_scalars
from tests.slurm_helpers import PREEMPTIBLE_GENERATION, job_record, launch, logs_cli, wait_for, wait_for_line

pytestmark = pytest.mark.slurm

TRAIN = ["task=train", "train.log_every=1", "train.checkpoint_every=100", "train.max_steps=10"]


def _final_weights(run_dir: str) -> dict[str, torch.Tensor]:
    newest = step_folders.complete_checkpoints(Path(run_dir) / "checkpoints")[0]
    return load_file(str(newest / "model.safetensors"))


def _losses(run_dir: str) -> dict[int, float]:
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines) if "loss" in rec}


# A LoRA of SDXL on two processes: adapters (on the UNet and both text encoders), their optimizer state and
# the SDXL conditioning through a real requeue (what is trained and saved is the method's and the family's
# business, not the loop's).
SDXL_LORA = (
    "model=tiny_sdxl",
    "train.method=lora",
    "train.lora.dropout=0.1",
    "train.lora.text_encoder_lr=1e-3",
)
# FLUX.1 on two processes: flow matching's timestep draws, packed latents and the guidance embedding through a
# real requeue, resumed mid-accumulation like the others.
FLUX_LORA = ("model=tiny_flux", "train.method=lora", "train.lora.dropout=0.1")
# SD 3.5 fully fine-tuned on two processes: the whole transformer and its AdamW moments through a requeue.
SD3_FULL = ("model=tiny_sd3",)


@pytest.mark.parametrize(
    ("tasks", "run"),
    [(1, ()), (2, ()), (2, SDXL_LORA), (2, FLUX_LORA), (2, SD3_FULL)],
    ids=["1-process", "2-process", "2-process-sdxl-lora", "2-process-flux-lora", "2-process-sd3-full"],
)
def test_preempted_training_requeues_and_matches_uninterrupted(
    slurm_cluster, tmp_path, cache_root, tasks, run
):
    shape = [f"cluster.tasks_per_node={tasks}", "cluster.cpus_per_task=1", "train.grad_accum=2", *run]
    proc, ids = launch(tmp_path / "a", cache_root, *TRAIN, *shape)
    assert proc.returncode == 0, proc.stderr
    (straight_id,) = ids["train"]

    pause = {"SDCLUSTER_TEST_PAUSE": "step:3"}  # the job holds at step 3 until the signal: always mid-run
    proc, ids = launch(tmp_path / "b", cache_root, *TRAIN, *shape, "train.tracker=tensorboard", env=pause)
    (job_id,) = ids["train"]
    log = tmp_path / "b" / "jobs" / job_id / f"{job_id}_0_log.out"
    wait_for_line(log, r"paused at step 3 ")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    assert wait_for(job_id)[0] == "COMPLETED"
    assert wait_for(straight_id)[0] == "COMPLETED"

    record = job_record(tmp_path / "b", job_id)
    first, second = record["attempts"]
    assert (first["state"], first["exit_reason"], first["requeued"]) == ("PREEMPTED", "preempted", True)
    assert first["step"] == 3
    assert (second["state"], second["restart_count"], second["step"]) == ("COMPLETED", 1, 10)
    resumed_log = log.read_text()
    assert f"resumed from {record['run_dir']}/checkpoints/step-{first['step']:08d}" in resumed_log
    shown = logs_cli(tmp_path / "b", job_id).stdout
    assert (
        "attempt 1 (restart 0): state PREEMPTED" in shown
        and "attempt 2 (restart 1): state COMPLETED" in shown
    )

    straight_run = job_record(tmp_path / "a", straight_id)["run_dir"]
    # every rank ends with the same trained weights (text encoder adapters included): gradients were averaged
    rank_logs = [
        (tmp_path / "b" / "jobs" / job_id / f"{job_id}_{r}_log.out").read_text() for r in range(tasks)
    ]
    sums = [re.findall(r"trained weights checksum at step 10: (\S+)", text)[-1] for text in rank_logs]
    assert len(set(sums)) == 1, sums
    a, b = _final_weights(straight_run), _final_weights(record["run_dir"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume was not exact"
    assert all("lora_" in k for k in a) == ("train.method=lora" in run)  # a LoRA checkpoint: adapters only
    assert _losses(straight_run) == _losses(record["run_dir"])
    # One TensorBoard run across the requeue: both attempts' event files, one curve, each step once.
    board = Path(record["run_dir"]) / "tensorboard"
    assert len(list(board.glob("events.out.tfevents.*"))) == 2
    curve = tensorboard_scalars(board, "loss")
    assert [step for step, _ in curve] == list(range(1, 11))
    assert [v for _, v in curve] == pytest.approx(list(_losses(record["run_dir"]).values()), rel=1e-6)


def test_time_limit_requeues_within_budget_then_stops(slurm_cluster, tmp_path, cache_root):
    """SLURM's own warning (USR2 60 s before a 2-minute limit): one requeue allowed, then a clear stop."""
    limits = ["cluster.timeout_min=2", "cluster.signal_delay_s=60", "cluster.max_timeouts=1"]
    proc, ids = launch(
        tmp_path, cache_root, "task=train", "train.max_steps=100000", "train.log_every=5", *limits
    )
    assert proc.returncode == 0, proc.stderr
    (job_id,) = ids["train"]
    state, code = wait_for(job_id, timeout_s=420)
    assert state == "FAILED" and code == "1:0"
    record = job_record(tmp_path, job_id)
    first, second = record["attempts"]
    assert (first["state"], first["requeued"]) == ("TIMEOUT", True)
    assert (second["state"], second["requeued"]) == ("TIMEOUT", False)
    assert second["step"] > first["step"] > 0, "the second attempt must continue, not restart"
    err = (tmp_path / "jobs" / job_id / f"{job_id}_0_log.err").read_text()
    assert "not requeued (cluster.max_timeouts=1, used 1)" in err
    assert (
        step_folders.read_meta(
            step_folders.complete_checkpoints(Path(record["run_dir"]) / "checkpoints")[0]
        ).step
        == second["step"]
    )


def test_preempted_generation_finishes_only_whats_missing(slurm_cluster, tmp_path, cache_root, tiny_model):
    gen = [
        *PREEMPTIBLE_GENERATION,
        f"generate.model={tiny_model}",
    ]
    proc, ids = launch(tmp_path, cache_root, *gen, env={"SDCLUSTER_TEST_PAUSE": "batch:2"})
    assert proc.returncode == 0, proc.stderr
    (job_id,) = ids["generate"]
    log = tmp_path / "jobs" / job_id / f"{job_id}_0_log.out"
    wait_for_line(log, r"paused at batch 2 ")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    assert wait_for(job_id)[0] == "COMPLETED"
    record = job_record(tmp_path, job_id)
    first, second = record["attempts"]
    assert first["state"] == "PREEMPTED" and first["step"] == 4  # two batches of two
    assert second["state"] == "COMPLETED"
    out = Path(record["outputs"]["images"])
    files = [json.loads(ln)["file"] for ln in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(files) == 24 == len(set(files)) == len(list(out.glob("p*-i*.png")))
    assert f"{first['step']} already done" in log.read_text()
