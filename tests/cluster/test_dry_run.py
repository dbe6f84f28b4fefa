"""``launch.dry_run=true`` prints exactly what would be submitted, arrays and dependencies included, and works
without a reachable SLURM controller (it says what it could not check)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def _dry_run(tmp: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    roots = [f"output_root={tmp / 'outputs'}", f"jobs_root={tmp / 'jobs'}", f"cache_root={tmp / 'cache'}"]
    args = [sys.executable, "-m", "sdcluster.launch", *[o for o in overrides if o.startswith("-")]]
    args += [
        "+cluster=slurm",
        "launch.dry_run=true",
        *roots,
        *[o for o in overrides if not o.startswith("-")],
    ]
    # A machine without SLURM's clients (a laptop): nothing to ask, so the dry run says what it did not check.
    env = {**os.environ, "PATH": str(tmp / "no-slurm-here"), "SDCLUSTER_HOME": str(tmp / "home")}
    return subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)


def _scripts(stdout: str) -> dict[str, str]:
    """``# job N: <kind>, ...`` header line -> the sbatch script printed under it."""
    parts = re.split(r"^(# job \d+: .*)$", stdout, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def test_sweep_dry_run_shows_arrays_dependencies_and_every_cluster_key(tmp_path):
    cluster = [
        "cluster.account=proj42",
        "cluster.qos=long",
        "cluster.mem_gb=4",
        "cluster.nodes=2",
        "cluster.gpus_per_node=2",
        "cluster.array_parallelism=3",
        "cluster.constraint=a100",
        "cluster.timeout_min=90",
        "cluster.signal_delay_s=300",
        "cluster.setup=['module load cuda']",
        "+cluster.additional_parameters.mail-type=END",
    ]
    proc = _dry_run(
        tmp_path, "-m", "task=train_generate", "generate.shards=4", "optim.lr=1e-4,5e-5", *cluster
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    scripts = _scripts(proc.stdout)
    heads = list(scripts)
    assert [h.split(",")[0] for h in heads] == ["# job 0: train", "# job 1: generate", "# job 2: generate"]
    train, gen0, gen1 = scripts.values()
    assert "#SBATCH --array=0-1%2" in train and "--dependency" not in train, "the points train as one array"
    for gen, point in ((gen0, 0), (gen1, 1)):
        assert "#SBATCH --array=0-3%3" in gen, "each point's 4 generation shards are one array, 3 at a time"
        assert f"#SBATCH --dependency=afterok:TRAIN-JOB-OF-POINT-{point}\n" in gen
        assert "#SBATCH --kill-on-invalid-dep=yes" in gen
    sizes = ["--mem=4096MB", "--nodes=2", "--gpus-per-node=2", "--ntasks-per-node=2"]  # a GPU, a process
    for script in scripts.values():
        for line in (
            "--account=proj42",
            "--qos=long",
            "--constraint=a100",
            "--time=90",
            "--signal=USR2@300",
            "--mail-type=END",
            *(sizes if script is train else ["--nodes=1", "--gpus-per-node=1", "--ntasks-per-node=1"]),
        ):
            assert f"#SBATCH {line}\n" in script, (line, script)
        assert "module load cuda" in script
    assert "--mem=" not in gen0, "generation shards are sized on their own (cluster.generate.*)"
    assert "# not checked: the cluster itself" in proc.stdout
    assert not (tmp_path / "jobs").exists() and not (tmp_path / "outputs" / "sweeps").exists()


def test_single_dry_run_without_a_controller_still_refuses_bad_input(tmp_path):
    proc = _dry_run(tmp_path, "task=train", "train.resolution=60")
    assert proc.returncode == 2 and "train.resolution" in proc.stderr
    proc = _dry_run(tmp_path, "task=train")
    assert proc.returncode == 0 and "#SBATCH --job-name=sdcluster-train" in proc.stdout
    assert "--array" not in proc.stdout
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "jobs").exists(), "dry runs write nothing"


def test_a_sharded_cache_is_built_by_one_array_that_the_training_waits_on(tmp_path):
    """``data.cache_shards`` > 1 with a training task: the cache array is queued first and the training array
    waits on all of it. An lr sweep over one dataset builds its one entry once; a point with other data
    gets an array of its own."""
    proc = _dry_run(tmp_path, "-m", "task=train", "data.cache_shards=3", "optim.lr=1e-4,5e-5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    scripts = _scripts(proc.stdout)
    heads = [h.split(",")[0] for h in scripts]
    assert heads == ["# job 0: cache", "# job 1: train"], list(scripts)
    cache, train = scripts.values()
    assert "array of 3 tasks, points [0, 1]" in next(iter(scripts))
    assert "#SBATCH --array=0-2" in cache and "--dependency" not in cache
    assert "#SBATCH --dependency=afterok:CACHE-JOB-OF-POINT-0\n" in train
    assert "#SBATCH --kill-on-invalid-dep=yes" in train

    other = _dry_run(tmp_path, "-m", "task=train", "data.cache_shards=2", "data.caption_dropout=0,0.1")
    assert other.returncode == 0, other.stderr[-3000:]
    heads = [h.split(",")[0] for h in _scripts(other.stdout)]
    assert heads[:2] == ["# job 0: cache", "# job 1: cache"], heads  # other data: another entry
    single = _dry_run(tmp_path, "task=train")  # one shard: the training job builds its own cache
    assert [h.split(",")[0] for h in _scripts(single.stdout)] == ["# job 0: train"]
