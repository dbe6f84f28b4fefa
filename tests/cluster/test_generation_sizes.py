"""The generation job is sized on its own (``cluster.generate.*``): one node, one task (one GPU when the
training has GPUs) per shard by default, its own time limit, memory and partition; the training job keeps
``cluster.*``. Checked where it shows: the rendered scripts, the checks before the queue (the partition's
limits with the generation job's own sizes, on the sandbox's controller) and a real job's accounting."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdcluster.cluster import backends
from sdcluster.cluster.preflight import preflight
from sdcluster.cluster.submit import plan_jobs
from sdcluster.config import ConfigError
from tests.conftest import REPO, compose
from tests.slurm_helpers import job_record, launch, wait_for

BIG_TRAINING = ["cluster.nodes=2", "cluster.gpus_per_node=4", "cluster.mem_gb=100", "cluster.cpus_per_task=8"]
SITE = ["cluster.account=proj42", "cluster.qos=long", "cluster.timeout_min=90"]


def _dry_run(tmp: Path, cwd: Path, *overrides: str, path: str | None = None) -> str:
    """A dry run (``+cluster=slurm launch.dry_run=true``) in ``cwd``, where ``conf/local/`` is read."""
    roots = [f"output_root={tmp / 'outputs'}", f"jobs_root={tmp / 'jobs'}", f"cache_root={tmp / 'cache'}"]
    args = [sys.executable, "-m", "sdcluster.launch", "+cluster=slurm", "launch.dry_run=true", *roots]
    env = {**os.environ, "SDCLUSTER_HOME": str(tmp / "home"), "PYTHONPATH": str(REPO)}
    if path is not None:
        env["PATH"] = path
    proc = subprocess.run([*args, *overrides], capture_output=True, text=True, cwd=cwd, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp / "jobs").exists(), "a dry run submits nothing"
    return proc.stdout


def _scripts(stdout: str) -> dict[str, str]:
    """Job kind -> the header lines and sbatch script the dry run printed for it."""
    parts = re.split(r"^# job \d+: (\w+), ", stdout, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _directives(script: str) -> set[str]:
    return set(re.findall(r"^#SBATCH (--[\w-]+(?:=\S+)?)$", script, re.M))


def test_generation_shards_get_one_node_and_one_gpu_whatever_the_training_asks(tmp_path):
    """Without a controller (a laptop): the scripts show each job's size, the shared settings in both."""
    out = _dry_run(
        tmp_path, REPO, "task=train_generate", "generate.shards=3", *BIG_TRAINING, *SITE,
        path=str(tmp_path / "no-slurm-here"),
    )  # fmt: skip
    scripts = _scripts(out)
    train, gen = _directives(scripts["train"]), _directives(scripts["generate"])
    assert {"--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4", "--mem=102400MB"} <= train
    assert {"--cpus-per-task=8", "--time=90"} <= train
    assert {"--nodes=1", "--gpus-per-node=1", "--ntasks-per-node=1"} <= gen
    assert any(d.startswith("--array=0-2%") for d in gen), "each of the 3 shards has that size"
    assert {"--cpus-per-task=8", "--time=90"} <= gen, "per process CPUs and the time limit are inherited"
    assert not any(d.startswith("--mem=") for d in gen), "the training's memory is sized for 8 processes"
    for directives in (train, gen):
        assert {"--account=proj42", "--qos=long", "--signal=USR2@120"} <= directives
    assert "# each task asks for 1 node(s) x 1 GPU(s) (1 process(es) in all), 90 min" in scripts["generate"]
    assert "# each job asks for 2 node(s) x 4 GPU(s) (8 process(es) in all), 90 min" in scripts["train"]


def test_generation_sizes_come_from_conf_local_and_the_command_line(tmp_path):
    """``conf/local/cluster.yaml`` of the working directory sets them like any cluster key; overrides win."""
    site = tmp_path / "site"
    (site / "conf" / "local").mkdir(parents=True)
    (site / "conf" / "local" / "cluster.yaml").write_text(
        "partition: train-gpus\ngenerate:\n  partition: infer\n  mem_gb: 16\n  timeout_min: 45\n"
    )
    out = _dry_run(
        tmp_path, site, "task=train_generate", *BIG_TRAINING,
        "cluster.generate.gpus_per_node=2", "cluster.generate.cpus_per_task=4",
        path=str(tmp_path / "no-slurm-here"),
    )  # fmt: skip
    scripts = _scripts(out)
    train, gen = _directives(scripts["train"]), _directives(scripts["generate"])
    assert {"--partition=train-gpus", "--nodes=2", "--gpus-per-node=4", "--time=60"} <= train
    assert {"--partition=infer", "--mem=16384MB", "--time=45", "--nodes=1"} <= gen
    assert {"--gpus-per-node=2", "--ntasks-per-node=2", "--cpus-per-task=4"} <= gen


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cluster.generate.nodes=0", r"^cluster.generate.nodes: got 0, must be >= 1"),
        ("cluster.generate.tasks_per_node=0", r"^cluster.generate.tasks_per_node: got 0, must be >= 1"),
        ("cluster.generate.gpus_per_node=-1", r"^cluster.generate.gpus_per_node: got -1, must be >= 0"),
        ("cluster.generate.cpus_per_task=0", r"^cluster.generate.cpus_per_task: got 0, must be >= 1"),
        ("cluster.generate.mem_gb=0", r"^cluster.generate.mem_gb: got 0.0, must be > 0 GB per node"),
        ("cluster.generate.timeout_min=0", r"^cluster.generate.timeout_min: got 0, must be >= 1"),
        ("cluster.generate.partition='a\nb'", r"^cluster.generate.partition: contains the control"),
    ],
)
def test_generation_sizes_out_of_range_are_refused(override, message):
    with pytest.raises(ConfigError, match=rf"{message}.*Fix: \S"):
        compose(["+cluster=slurm", override])


def test_each_job_checks_the_warning_signal_against_its_own_time_limit():
    cfg = compose(["+cluster=slurm", "task=train_generate", "cluster.generate.timeout_min=2"])
    with pytest.raises(
        ConfigError,
        match=r"^cluster.signal_delay_s: got 120, must be below the time limit "
        r"\(cluster.generate.timeout_min=2: 120 s\)\. Fix: .*or a longer cluster.generate.timeout_min",
    ):
        backends.of(cfg).check_config(cfg)
    train_only = compose(["+cluster=slurm", "task=train", "cluster.generate.timeout_min=2"])
    backends.of(train_only).check_config(train_only)  # no generation job: its limit is not used


def test_the_local_executor_refuses_a_generation_job_of_several_processes():
    cfg = compose(["task=train_generate", "cluster.generate.tasks_per_node=2"])
    with pytest.raises(
        ConfigError, match=r"^cluster.generate.tasks_per_node/nodes: the local executor runs one process"
    ):
        backends.of(cfg).check_config(cfg)


@pytest.mark.slurm
def test_the_partitions_limits_apply_to_the_generation_job_with_its_own_sizes(slurm_cluster, make_cfg):
    """The sandbox's node is the whole of ``debug``; ``short`` allows 60 minutes."""
    base = ["+cluster=slurm", "task=train_generate", "cluster.timeout_min=90"]
    with pytest.raises(
        ConfigError,
        match=r"^cluster.generate.timeout_min: got 90, but partition 'short' \(the generation job's\) allows "
        r"60 minutes \(MaxTime\)\. Fix: cluster.generate.timeout_min=60 or less",
    ):  # the training (debug, no limit) fits: the generation job, inheriting 90 minutes, does not
        preflight(make_cfg([*base, "cluster.generate.partition=short"]), dry_run=True)
    with pytest.raises(
        ConfigError, match=r"^cluster.generate.nodes: got 2, but partition 'debug' \(the generation job's\)"
    ):
        preflight(make_cfg([*base, "cluster.generate.nodes=2"]), dry_run=True)
    with pytest.raises(ConfigError, match=r"^cluster.generate.partition: 'nosuch' is not a partition"):
        preflight(make_cfg([*base, "cluster.generate.partition=nosuch"]), dry_run=True)
    fits = [*base, "cluster.generate.partition=short", "cluster.generate.timeout_min=60"]
    assert preflight(make_cfg(fits), dry_run=True)[1] == []


@pytest.mark.slurm
def test_a_generation_only_launch_is_sized_and_checked_as_generation(slurm_cluster, tmp_path, tiny_model):
    """Training settings the sandbox could never run (2 nodes) do not stop a launch that only generates."""
    out = _dry_run(
        tmp_path, REPO, "task=generate", f"generate.model={tiny_model}", "cluster.nodes=2",
        "cluster.tasks_per_node=3", "cluster.generate.timeout_min=30",
    )  # fmt: skip
    scripts = _scripts(out)
    assert list(scripts) == ["generate"] and "# not checked" not in out
    assert {"--nodes=1", "--ntasks-per-node=1", "--time=30"} <= _directives(scripts["generate"])


@pytest.mark.slurm
def test_a_generation_shard_runs_as_one_task_after_a_two_task_training(
    slurm_cluster, tmp_path, cache_root, tiny_model
):
    """What SLURM ran, from its accounting: the training's step had 2 tasks, the generation's 1."""
    run = ["task=train_generate", "train.max_steps=2", "train.checkpoint_every=2"]
    gen = ["generate.prompts=['jeans']", "generate.num_images=2", "generate.steps=2"]
    two = ["cluster.tasks_per_node=2", "cluster.cpus_per_task=1"]
    proc, ids = launch(tmp_path, cache_root, *run, *gen, *two)
    assert proc.returncode == 0, proc.stderr
    (train_id,), (gen_id,) = ids["train"], ids["generate"]
    assert wait_for(gen_id)[0] == "COMPLETED", tmp_path / "jobs" / gen_id / f"{gen_id}_0_log.err"
    assert wait_for(train_id)[0] == "COMPLETED"
    assert _step_tasks(train_id) == {f"{train_id}.0": "2"}
    assert _step_tasks(gen_id) == {f"{gen_id}.0": "1"}
    assert job_record(tmp_path, train_id)["world_size"] == 2
    assert job_record(tmp_path, gen_id)["world_size"] == 1
    log = (tmp_path / "jobs" / gen_id / f"{gen_id}_0_log.out").read_text()
    assert "rendezvous" not in log and "shard 0/1: 2 images" in log, "one process, no rendezvous"
    assert not (tmp_path / "jobs" / gen_id / f"{gen_id}_1_log.out").exists()


def _step_tasks(job_id: str) -> dict[str, str]:
    """{step id: tasks} of a job's numbered steps (the srun that ran the callable), from sacct."""
    out = subprocess.run(
        ["sacct", "-j", job_id, "-n", "-P", "-o", "JobID,NTasks"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    rows = (line.split("|") for line in out.stdout.splitlines() if line.strip())
    return {step: tasks for step, tasks in rows if re.fullmatch(rf"{job_id}\.\d+", step)}


def test_points_that_differ_only_in_generation_sizes_still_train_as_one_array():
    points = [
        compose(["+cluster=slurm", "task=train_generate", f"cluster.generate.timeout_min={limit}"])
        for limit in (30, 45)
    ]
    plan = plan_jobs(points)
    shapes = [(job.kind, job.points) for job in plan]
    assert shapes == [("train", [0, 1]), ("generate", [0]), ("generate", [1])]
    assert [job.cfgs[0].cluster.timeout_min for job in plan] == [60, 30, 45]
