"""A preempted train.strategy=fsdp job on the SLURM sandbox: two tasks, USR2, requeue, a bit-exact resume."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from sdcluster.train import step_folders
from tests.slurm_helpers import job_record, launch, wait_for, wait_for_line

pytestmark = pytest.mark.slurm

RUN = [
    "task=train",
    "train.strategy=fsdp",
    "train.use_ema=true",
    "train.log_every=1",
    "train.checkpoint_every=100",
    "train.max_steps=8",
    "train.grad_accum=2",
    "cluster.tasks_per_node=2",
    "cluster.cpus_per_task=1",
]


def _final_state(run_dir: str, tmp: Path) -> dict:
    """The newest checkpoint's sharded state (model, AdamW moments, EMA) gathered whole."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    newest = step_folders.complete_checkpoints(Path(run_dir) / "checkpoints")[0]
    assert step_folders.read_meta(newest).world_size == 2
    dest = tmp / "state.pt"  # read back at once: the next call may overwrite it
    dcp_to_torch_save(newest / "sharded", dest)
    return torch.load(dest, weights_only=False)


def _tensors(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            found |= _tensors(value, f"{prefix}{key}.")
        elif isinstance(value, torch.Tensor):
            found[f"{prefix}{key}"] = value
    return found


def test_a_preempted_fsdp_job_resumes_bit_exact(slurm_cluster, tmp_path, cache_root):
    proc, ids = launch(tmp_path / "a", cache_root, *RUN)
    assert proc.returncode == 0, proc.stderr
    (straight_id,) = ids["train"]
    proc, ids = launch(tmp_path / "b", cache_root, *RUN, env={"SDCLUSTER_TEST_PAUSE": "step:3"})
    assert proc.returncode == 0, proc.stderr
    (job_id,) = ids["train"]
    wait_for_line(tmp_path / "b" / "jobs" / job_id / f"{job_id}_0_log.out", r"paused at step 3 ")
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    assert wait_for(job_id)[0] == "COMPLETED"
    assert wait_for(straight_id)[0] == "COMPLETED"

    record = job_record(tmp_path / "b", job_id)
    first, second = record["attempts"]
    assert (first["state"], first["step"], first["requeued"]) == ("PREEMPTED", 3, True)
    assert (second["state"], second["step"]) == ("COMPLETED", 8)
    log = (tmp_path / "b" / "jobs" / job_id / f"{job_id}_1_log.out").read_text()
    assert f"resumed from {record['run_dir']}/checkpoints/step-00000003" in log  # rank 1 too

    straight = _tensors(_final_state(job_record(tmp_path / "a", straight_id)["run_dir"], tmp_path))
    resumed = _tensors(_final_state(record["run_dir"], tmp_path))
    assert straight.keys() == resumed.keys() and any(k.startswith("ema.") for k in straight)
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), f"{name} differs"
