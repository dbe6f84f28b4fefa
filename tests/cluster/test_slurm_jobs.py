"""Real jobs on the single-node SLURM the suite starts: submit, multi-process, chains, failures, logs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdcluster.data import latent_build
from sdcluster.data.loader import training_rows
from sdcluster.models.load import load_components
from tests.conftest import REPO, compose
from tests.slurm_helpers import job_record, launch, logs_cli, wait_for, wait_for_line

pytestmark = pytest.mark.slurm

TRAIN = ["task=train", "train.max_steps=4", "train.log_every=1", "train.checkpoint_every=2"]
SECRET = "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123"


def test_single_process_train_job_and_its_logs(slurm_cluster, tmp_path, cache_root, tiny_model):
    proc, ids = launch(tmp_path, cache_root, *TRAIN, env={"HF_TOKEN": SECRET})
    assert proc.returncode == 0, proc.stderr
    (job_id,) = ids["train"]
    assert f"python -m sdcluster.logs {job_id} --follow" in proc.stdout
    assert wait_for(job_id)[0] == "COMPLETED"

    folder = tmp_path / "jobs" / job_id
    names = {p.name for p in folder.iterdir()}
    assert {f"{job_id}_submission.sh", f"{job_id}_0_log.out", "config.yaml", "job.json"} <= names
    record = job_record(tmp_path, job_id)
    assert record["state"] == "COMPLETED" and record["step"] == 4 and record["cluster"] == "slurm"
    log = (folder / f"{job_id}_0_log.out").read_text()
    assert "\r" not in log and re.search(r"step 4/4 \| loss [\d.]+ \| lr [\d.e-]+ \| [\d.]+ it/s \| eta", log)

    shown = logs_cli(tmp_path, job_id)
    assert shown.returncode == 0
    assert "scheduler state: COMPLETED (exit code 0:0)" in shown.stdout
    assert "last progress:   step 4/4" in shown.stdout and record["run_dir"] in shown.stdout
    val_loss = re.search(r"validation step 4 \| val_loss ([\d.]+)", log).group(1)
    assert f"validation:      step 4 val_loss {val_loss} (best {val_loss} at step 4)" in shown.stdout
    listing = logs_cli(tmp_path)
    assert job_id in listing.stdout and "COMPLETED" in listing.stdout

    for path in [*folder.rglob("*"), *(tmp_path / "outputs").rglob("*")]:
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"token leaked into {path}"


def test_two_process_training_is_a_real_distributed_run(slurm_cluster, tmp_path, cache_root, tiny_model):
    proc, ids = launch(tmp_path, cache_root, *TRAIN, "cluster.tasks_per_node=2", "cluster.cpus_per_task=1")
    assert proc.returncode == 0, proc.stderr
    (job_id,) = ids["train"]
    assert wait_for(job_id)[0] == "COMPLETED"
    folder = tmp_path / "jobs" / job_id
    logs = [(folder / f"{job_id}_{rank}_log.out").read_text() for rank in (0, 1)]
    assert "effective batch 4 (per device 2 x accumulation 1 x 2 processes)" in logs[0]
    samples = [re.search(r"this rank's next samples (\[.*\])", log).group(1) for log in logs]
    assert samples[0] != samples[1], "ranks must read different samples"
    sums = [re.search(r"unet weights checksum at step 4: (\S+)", log).group(1) for log in logs]
    assert sums[0] == sums[1], "replicas drifted apart"
    run_dir = job_record(tmp_path, job_id)["run_dir"]
    records = [json.loads(ln) for ln in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4], "only rank 0 writes run-level files"
    assert [r["step"] for r in records if "val_loss" in r] == [4]  # the final validation, shared by 2 ranks
    assert all(f"validation step 4 | val_loss {records[-1]['val_loss']:.4f}" in log for log in logs)


def test_train_then_generate_chain(slurm_cluster, tmp_path, cache_root, tiny_model):
    canary = tmp_path / "injected"  # a path of this test only: another run cannot create or hide it
    prompts = f"generate.prompts=['$(touch {canary})', 'jeans with \"quotes\" and ; semicolons']"
    overrides = [*TRAIN, "task=train_generate", prompts, "generate.num_images=1", "generate.steps=2"]
    proc, ids = launch(tmp_path, cache_root, *overrides, env={"HF_TOKEN": SECRET})
    assert proc.returncode == 0, proc.stderr
    (train_id,), (gen_id,) = ids["train"], ids["generate"]
    script = (tmp_path / "jobs" / gen_id / f"{gen_id}_submission.sh").read_text()
    assert f"--dependency=afterok:{train_id}" in script
    assert "--kill-on-invalid-dep=yes" in script, "a failed training must drop its generation job"
    assert wait_for(gen_id)[0] == "COMPLETED"
    assert wait_for(train_id)[0] == "COMPLETED"
    out = job_record(tmp_path, gen_id)["outputs"]["images"]
    manifest = [json.loads(ln) for ln in Path(out, "manifest.jsonl").read_text().splitlines()]
    assert [m["prompt"] for m in manifest] == [
        f"$(touch {canary})",
        'jeans with "quotes" and ; semicolons',
    ]
    assert not canary.exists(), "a prompt was run as shell"
    for path in [*tmp_path.rglob("*"), *cache_root.rglob("*")]:  # train + generate on the cluster: no leak
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"token leaked into {path}"


def test_job_failing_on_the_node_is_reported_with_its_log(slurm_cluster, tmp_path, cache_root):
    proc, ids = launch(tmp_path, cache_root, *TRAIN, "cluster.setup=['echo broken module load >&2','exit 3']")
    assert proc.returncode == 0, proc.stderr
    (job_id,) = ids["train"]
    state, code = wait_for(job_id)
    assert (state, code) == ("FAILED", "3:0")
    shown = logs_cli(tmp_path, job_id, "--err")
    assert "scheduler state: FAILED (exit code 3:0)" in shown.stdout
    assert "broken module load" in shown.stdout


def test_a_rank_that_dies_ends_the_job_instead_of_leaving_the_others_waiting(
    slurm_cluster, tmp_path, cache_root, tiny_model
):
    """Rank 0 cannot open the rendezvous (its port is held, as a connection once held it in this suite):
    rank 1 would wait for it until the time limit, holding the node. srun ends the job instead."""
    with socket.socket() as held:
        held.bind(("", 0))
        held.listen()
        two = ["cluster.tasks_per_node=2", "cluster.cpus_per_task=1"]
        port = {"MASTER_PORT": str(held.getsockname()[1])}  # what the job is told to use
        proc, ids = launch(tmp_path, cache_root, *TRAIN, *two, env=port)
        assert proc.returncode == 0, proc.stderr
        (job_id,) = ids["train"]
        state, _ = wait_for(job_id, timeout_s=180)  # not cluster.timeout_min (20 min)
    assert state == "FAILED"
    assert "address already in use" in (tmp_path / "jobs" / job_id / f"{job_id}_0_log.err").read_text()


def test_wait_streams_and_returns_the_jobs_outcome(slurm_cluster, tmp_path, cache_root, tiny_model):
    two = ["cluster.tasks_per_node=2", "cluster.cpus_per_task=1"]  # several tasks: results(), not result()
    proc, ids = launch(tmp_path / "ok", cache_root, *TRAIN, *two, "launch.wait=true")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "step 4/4 | loss" in proc.stdout  # the rank-0 log, streamed while waiting
    assert f"train job {ids['train'][0]} COMPLETED" in proc.stdout
    proc, ids = launch(tmp_path, cache_root, *TRAIN, "launch.wait=true", "cluster.setup=['exit 5']")
    assert proc.returncode == 1
    assert f"train job {ids['train'][0]} FAILED" in proc.stdout
    assert f"python -m sdcluster.logs {ids['train'][0]}" in proc.stdout


def test_submission_errors_before_queueing(slurm_cluster, tmp_path, cache_root):
    proc, ids = launch(tmp_path, cache_root, *TRAIN, "cluster.partition=nosuch")
    assert proc.returncode == 2 and not ids
    assert "cluster.partition: 'nosuch' is not a partition" in proc.stderr and "debug" in proc.stderr
    proc, _ = launch(tmp_path, cache_root, *TRAIN, env={"PATH": "/nonexistent"})
    assert proc.returncode == 2 and "`sbatch` is not on PATH" in proc.stderr
    assert not (tmp_path / "jobs").exists()


def test_unreachable_controller_is_reported_before_queueing(slurm_cluster, tmp_path, cache_root):
    conf = slurm_cluster.slurm_conf.read_text()
    port = re.search(r"^SlurmctldPort=(\d+)", conf, re.M).group(1)
    dead = tmp_path / "slurm.conf"
    dead.write_text(conf.replace(f"SlurmctldPort={port}", "SlurmctldPort=1"))
    proc, ids = launch(tmp_path, cache_root, *TRAIN, env={"SLURM_CONF": str(dead)})
    assert proc.returncode == 2 and not ids
    assert "the SLURM controller did not answer" in proc.stderr and "scontrol ping" in proc.stderr


def test_dry_run_prints_script_and_submits_nothing(slurm_cluster, tmp_path, cache_root):
    proc, ids = launch(tmp_path, cache_root, *TRAIN, "launch.dry_run=true", "cluster.partition=short")
    assert proc.returncode == 0 and not ids
    assert "#SBATCH --partition=short" in proc.stdout and "#SBATCH --signal=USR2@120" in proc.stdout
    assert "max_steps: 4" in proc.stdout
    assert not (tmp_path / "jobs").exists()


def test_unknown_job_id_is_a_clear_message(tmp_path):
    shown = logs_cli(tmp_path, "999999999")
    assert shown.returncode == 2 and "no job 999999999" in shown.stderr


def test_generation_after_a_failed_training_is_dropped_and_explained(slurm_cluster, tmp_path, cache_root):
    broken = ["task=train_generate", "train.max_steps=2", "cluster.setup=['exit 4']", "generate.steps=2"]
    proc, ids = launch(tmp_path, cache_root, *broken)
    assert proc.returncode == 0, proc.stderr
    (train_id,), (gen_id,) = ids["train"], ids["generate"]
    assert wait_for(train_id)[0] == "FAILED"
    assert wait_for(gen_id)[0] == "CANCELLED", "the scheduler drops it instead of leaving it PENDING"
    shown = logs_cli(tmp_path, gen_id)
    assert f"never ran: it waited (afterok) on job {train_id}, which ended FAILED" in shown.stdout


def test_logs_follow_and_task_read_any_ranks_log(slurm_cluster, tmp_path, cache_root, tiny_model):
    two = ["cluster.tasks_per_node=2", "cluster.cpus_per_task=1"]
    proc, ids = launch(tmp_path, cache_root, *TRAIN, *two)
    assert proc.returncode == 0, proc.stderr
    (job_id,) = ids["train"]
    # --follow returns when the job ends, having printed the whole log
    followed = logs_cli(tmp_path, job_id, "--follow", timeout=300)
    assert followed.returncode == 0 and "step 4/4 | loss" in followed.stdout
    assert wait_for(job_id)[0] == "COMPLETED"
    rank1 = logs_cli(tmp_path, job_id, "--task", "1")
    assert f"---- {tmp_path / 'jobs' / job_id / f'{job_id}_1_log.out'}" in rank1.stdout
    assert "[rank 1]" in rank1.stdout and "[rank 0]" not in rank1.stdout.split("----")[-1]


def test_first_job_of_a_fresh_checkout_with_two_processes(slurm_cluster, tmp_path, tiny_model):
    """Nothing built yet: two ranks at once build the tiny model and the latent cache (no session fixture)."""
    fresh = tmp_path / "fresh-cache"
    two = ["cluster.tasks_per_node=2", "cluster.cpus_per_task=1"]
    proc, ids = launch(tmp_path, fresh, *TRAIN, *two)
    assert proc.returncode == 0, proc.stderr
    (job_id,) = ids["train"]
    assert wait_for(job_id)[0] == "COMPLETED", logs_cli(tmp_path, job_id, "--err").stdout[-3000:]
    built = fresh / "models" / "tiny" / tiny_model.name
    assert list((built / "text_encoder").glob("*.safetensors")), "the model published by rank 0 is whole"
    (entry,) = (p for p in (fresh / "latents").iterdir() if not p.name.startswith("."))  # not the lock
    assert sorted(p.name for p in entry.glob("*.npy")) == [
        "posterior.0.npy",
        "posterior.1.npy",
        "text.0.npy",
        "text.1.npy",
    ], "both ranks encoded their share of the cache"
    again, ids = launch(tmp_path / "again", fresh, *TRAIN, *two)  # every later job on it works too
    assert again.returncode == 0 and wait_for(ids["train"][0])[0] == "COMPLETED"

    # The two ranks' shards hold what one process encodes (up to batch rounding: ranks batch other rows).
    from tests.data.test_latent_cache import ONE_PROCESS

    one_rank = tmp_path / "one-rank-cache"
    shutil.copytree(fresh / "models", one_rank / "models")
    cfg = compose([*TRAIN, f"cache_root={one_rank}", f"output_root={tmp_path / 'o'}"])
    comps = load_components(cfg.model, cfg.cache_root)
    dataset = training_rows(cfg)  # the rows the cache holds, as the loader selects them
    single = latent_build.open_or_build(cfg, dataset, comps, ONE_PROCESS)
    for kind in ("posterior", "text"):
        sharded = np.concatenate([np.load(entry / f"{kind}.{r}.npy") for r in (0, 1)])
        alone = np.load(single.entry / f"{kind}.0.npy")
        np.testing.assert_allclose(sharded, alone, rtol=0, atol=1e-4, err_msg=kind)


def test_a_second_launch_of_a_queued_run_is_refused_until_the_holder_ends(
    slurm_cluster, tmp_path, cache_root
):
    hold = {"SDCLUSTER_TEST_PAUSE": "step:1"}  # the first job holds its run folder until signalled
    proc, ids = launch(tmp_path, cache_root, *TRAIN, env=hold)
    assert proc.returncode == 0, proc.stderr
    (holder,) = ids["train"]
    again, again_ids = launch(tmp_path, cache_root, *TRAIN)
    assert again.returncode == 2 and not again_ids
    assert f"is in use by job {holder} (" in again.stderr and f"scancel {holder}" in again.stderr
    subprocess.run(["scancel", holder], check=True, timeout=30)
    assert wait_for(holder)[0] == "CANCELLED"
    taken, taken_ids = launch(tmp_path, cache_root, *TRAIN)  # a finished holder is taken over
    assert taken.returncode == 0, taken.stderr
    assert wait_for(taken_ids["train"][0])[0] == "COMPLETED"


@pytest.mark.parametrize(
    "inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["sigint-default", "sigint-ignored"]
)
def test_ctrl_c_while_waiting_stops_the_waiting_not_the_job(
    slurm_cluster, tmp_path, cache_root, tiny_model, inherited
):
    """Whatever SIGINT disposition the launcher inherited (ignored: a background job of a script)."""
    hold = {"SDCLUSTER_TEST_PAUSE": "step:1"}  # the job is surely still running when Ctrl-C comes
    args = [sys.executable, "-m", "sdcluster.launch", "+cluster=slurm", "launch.wait=true", *TRAIN]
    args += [
        f"output_root={tmp_path / 'outputs'}",
        f"jobs_root={tmp_path / 'jobs'}",
        f"cache_root={cache_root}",
    ]
    out = tmp_path / "launch.out"
    env = {**os.environ, "SDCLUSTER_HOME": str(tmp_path / "home"), **hold}
    with out.open("w") as fh:
        proc = subprocess.Popen(
            args,
            cwd=REPO,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, inherited),
        )
    job_id = re.search(r"submitted train job (\S+):", wait_for_line(out, r"submitted train job")).group(1)
    wait_for_line(tmp_path / "jobs" / job_id / f"{job_id}_0_log.out", r"paused at step 1 ")
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 1
    said = out.read_text()
    assert f"stopped waiting; train job {job_id} goes on" in said and "Traceback" not in said, said
    assert wait_for(job_id, states={"RUNNING"})[0] == "RUNNING", "the job was not touched"
    subprocess.run(["scancel", job_id], check=True, timeout=30)
