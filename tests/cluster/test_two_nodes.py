"""Two real SLURM nodes (n1, n2: own network namespace and hostname each): one training process per node.

Each two-node job holds both nodes (one CPU each), so these jobs run one after another; the uninterrupted
run is made once per module and every test compares against it. The same training as 1 node x 2 tasks runs
on the single-node cluster meanwhile, for the layout comparison. The two-node cluster is started by the
session fixture ``slurm_two_nodes`` (tests/slurm_cluster.py) and removed at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sdcluster.train import step_folders
from tests import sandbox
from tests.sandbox import layout, netns
from tests.sandbox.daemons import _pid
from tests.slurm_helpers import job_record, launch, logs_cli, wait_for, wait_for_line, wait_until

pytestmark = pytest.mark.slurm

# cpus_per_task=1 on both layouts: the thread count is part of what a CPU run's bits depend on
# (docs/reference/sandbox.md).
TRAIN = [
    "task=train",
    "train.max_steps=8",
    "train.grad_accum=2",
    "train.log_every=1",
    "train.checkpoint_every=100",
    "train.validation_prompts=[]",  # the held-out loss only: validation images cost seconds here
    "cluster.cpus_per_task=1",
]
TWO_NODES = ["cluster.nodes=2", "cluster.tasks_per_node=1"]


@dataclass(frozen=True)
class Run:
    root: Path  # output_root, jobs_root under it
    cache: Path
    job_id: str

    @property
    def record(self) -> dict:
        return job_record(self.root, self.job_id)

    def weights(self) -> dict[str, torch.Tensor]:
        newest = step_folders.complete_checkpoints(Path(self.record["run_dir"]) / "checkpoints")[0]
        return load_file(str(newest / "model.safetensors"))

    def latents(self) -> dict[str, np.ndarray]:
        """The latent cache entry this run built: every stored array, by file name."""
        (entry,) = [p for p in (self.cache / "latents").iterdir() if (p / "manifest.json").is_file()]
        return {f.name: np.load(f) for f in sorted(entry.glob("*.npy"))}


def _fresh_cache(root: Path, tiny_model: Path, cache_root: Path) -> Path:
    """A cache root holding only the (already built) tiny model: the job builds its own latent cache."""
    dest = root / tiny_model.relative_to(cache_root)
    shutil.copytree(tiny_model, dest)  # copy2 keeps mtimes, so the latent-cache key sees the same model
    return root


def _train(tmp: Path, cache: Path, conf: Path, *extra: str, env: dict | None = None) -> Run:
    proc, ids = launch(tmp, cache, *TRAIN, *extra, env={"SLURM_CONF": str(conf), **(env or {})})
    assert proc.returncode == 0, proc.stderr
    (job_id,) = ids["train"]
    return Run(tmp, cache, job_id)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


@pytest.fixture(scope="module")
def one_node_run(slurm_cluster, tmp_path_factory, cache_root, tiny_model) -> Run:
    """The same training as 1 node x 2 tasks on the single-node cluster, with its own latent cache.

    Only submitted here: it runs while the two-node run does (other cluster), and its test waits for it.
    """
    tmp = tmp_path_factory.mktemp("one-node-straight")
    cache = _fresh_cache(tmp / "cache", tiny_model, cache_root)
    return _train(tmp, cache, slurm_cluster.slurm_conf, "cluster.tasks_per_node=2")


@pytest.fixture(scope="module")
def two_node_run(_two_node_sandbox, one_node_run, tmp_path_factory, cache_root, tiny_model) -> Run:
    """The uninterrupted two-node run every test compares against; it builds its own latent cache."""
    tmp = tmp_path_factory.mktemp("two-node-straight")
    cache = _fresh_cache(tmp / "cache", tiny_model, cache_root)
    run = _train(tmp, cache, _two_node_sandbox.slurm_conf, *TWO_NODES)
    state = wait_for(run.job_id, slurm_conf=_two_node_sandbox.slurm_conf)
    assert state == ("COMPLETED", "0:0"), (tmp / "jobs" / run.job_id / f"{run.job_id}_0_log.err").read_text()
    return run


def test_two_node_sandbox_has_two_named_nodes(slurm_two_nodes) -> None:
    def states() -> list[str]:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, check=True)
        return sorted(set(out.stdout.split("\n")) - {""})

    # a node whose job just ended shows "comp" for a moment (the sandbox's own probe, an earlier test's job)
    assert wait_until(lambda: states() == ["n1 idle", "n2 idle"], timeout_s=60), states()
    assert slurm_two_nodes.nodes == ("n1", "n2")


def test_training_on_two_nodes_rendezvous_on_n1_and_repeats_bit_for_bit(
    slurm_two_nodes, two_node_run, tmp_path
) -> None:
    first = two_node_run
    again = _train(tmp_path, first.cache, slurm_two_nodes.slurm_conf, *TWO_NODES)
    assert wait_for(again.job_id) == ("COMPLETED", "0:0")
    for run in (first, again):
        folder = run.root / "jobs" / run.job_id
        for task, host in enumerate(["n1", "n2"]):
            log = (folder / f"{run.job_id}_{task}_log.out").read_text()
            assert f"hostname={host}," in log, f"task {task} did not run on {host}"
            assert f"[rank {task}] INFO rendezvous n1:" in log and f"rank {task}/2" in log
            assert f"[rank {task}] INFO torch threads: 1 " in log
        (attempt,) = run.record["attempts"]
        assert (attempt["state"], attempt["host"], attempt["cpu_threads"]) == ("COMPLETED", "n1", 1)
    assert _same(first.weights(), again.weights()), "two identical two-node runs differ"


def test_logs_reads_each_tasks_log(slurm_two_nodes, two_node_run) -> None:
    for task, host in enumerate(["n1", "n2"]):
        shown = logs_cli(two_node_run.root, two_node_run.job_id, "--task", str(task))
        assert shown.returncode == 0, shown.stderr
        log_path = two_node_run.root / "jobs" / two_node_run.job_id / f"{two_node_run.job_id}_{task}_log.out"
        assert f"---- {log_path}" in shown.stdout
        assert f"hostname={host}," in shown.stdout and f"[rank {task}] INFO" in shown.stdout
        assert "host n1, cpu_threads 1" in shown.stdout  # rank 0's attempt record, whichever task is shown
    err = logs_cli(two_node_run.root, two_node_run.job_id, "--task", "1", "--err")
    assert f"{two_node_run.job_id}_1_log.err" in err.stdout


def test_preempted_two_node_job_resumes_bit_exact(slurm_two_nodes, two_node_run, tmp_path) -> None:
    pause = {"SDCLUSTER_TEST_PAUSE": "step:3"}  # the job holds at step 3 until the signal: always mid-run
    run = _train(tmp_path, two_node_run.cache, slurm_two_nodes.slurm_conf, *TWO_NODES, env=pause)
    log = tmp_path / "jobs" / run.job_id / f"{run.job_id}_0_log.out"
    wait_for_line(log, r"paused at step 3 ")
    subprocess.run(["scancel", "--signal=USR2", run.job_id], check=True, timeout=30)
    assert wait_for(run.job_id) == ("COMPLETED", "0:0")
    first, second = run.record["attempts"]
    assert (first["state"], first["exit_reason"], first["requeued"], first["step"]) == (
        "PREEMPTED",
        "preempted",
        True,
        3,
    )
    assert (second["state"], second["restart_count"], second["step"]) == ("COMPLETED", 1, 8)
    assert f"resumed from {run.record['run_dir']}/checkpoints/step-00000003" in log.read_text()
    # Both ranks came back on their own nodes and met on n1 again.
    task1 = (tmp_path / "jobs" / run.job_id / f"{run.job_id}_1_log.out").read_text()
    assert task1.count("hostname=n2,") == 2 and task1.count("rendezvous n1:") == 2
    assert _same(two_node_run.weights(), run.weights()), "the preempted run did not resume exactly"


def test_two_nodes_by_one_task_equal_one_node_by_two_tasks(slurm_cluster, two_node_run, one_node_run) -> None:
    """Same seed and world size, other layout, each building its own latent cache: the same bits.

    Before distributed.setup exported its thread count, accelerate replaced it by physical cores / processes
    on the node: 2 threads per rank on two nodes, 1 on one node, and the runs ended 5e-5 apart.
    """
    assert wait_for(one_node_run.job_id, slurm_conf=slurm_cluster.slurm_conf) == ("COMPLETED", "0:0")
    assert one_node_run.record["attempts"][0]["cpu_threads"] == 1
    assert _same(two_node_run.latents(), one_node_run.latents()), "the layouts built different latent caches"
    assert _same(two_node_run.weights(), one_node_run.weights()), "the layouts trained different weights"


def test_start_recovers_from_a_crashed_session_and_stop_removes_everything(slurm_two_nodes) -> None:
    """What a killed session leaves (a dead slurmd, its namespace, the bridge, /etc/hosts lines) is
    cleared by the next start, which brings both nodes back; a start on a healthy cluster reuses it; stop
    leaves no namespace, veth, bridge or /etc/hosts line behind (what the session's finalizer relies on).

    Last in the module: it restarts and finally stops the cluster under the tests before it.
    """
    d = slurm_two_nodes.state_dir
    lay = layout.saved(d)
    assert sandbox.start(nodes=2) == slurm_two_nodes  # healthy: reused as it is
    dead = lay.daemon(lay.nodes[1])
    pid = _pid(d, dead)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: _pid(d, dead) is None), "slurmd n2 survived SIGKILL"
    assert not sandbox.is_running(d, nodes=2)
    # ... and what a session with another node count, killed mid-setup, would have left besides.
    for argv in (
        ["netns", "add", "sdcluster-n7"],
        ["link", "add", "sdcvn9", "type", "veth", "peer", "name", "sdcvx"],
    ):
        subprocess.run(["ip", *argv], check=True, timeout=30)
    with open("/etc/hosts", "a") as hosts_file:
        hosts_file.write("10.231.0.8 n7 # sdcluster-sandbox\n")

    assert sandbox.start(nodes=2) == slurm_two_nodes
    assert sandbox.is_running(d, nodes=2)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert sorted(ln.split()[0] for ln in listed.splitlines() if "sdcluster-n" in ln) == [
        "sdcluster-n1",
        "sdcluster-n2",
    ]
    hosts = Path("/etc/hosts").read_text()
    assert hosts.count("n1 # sdcluster-sandbox") == 1 and hosts.count("n2 # sdcluster-sandbox") == 1
    assert "n7 #" not in hosts
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert "sdcvn9" not in links and "sdcvx" not in links
    srun = ["srun", "-N2", "-n2", "--cpus-per-task=1", "hostname"]
    out = subprocess.run(srun, capture_output=True, text=True, timeout=60, check=True).stdout
    assert sorted(out.split()) == ["n1", "n2"]

    sandbox.stop(d, nodes=2)
    assert not netns.exists() and "sdcluster-sandbox" not in Path("/etc/hosts").read_text()
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert "sdcv" not in links and netns.BRIDGE not in links
    assert all(_pid(d, daemon) is None for daemon in lay.daemons)
