"""A job the partition can never run is refused before the queue, naming the partition, its limit and the fix.

SLURM itself accepts such a job (without ``EnforcePartLimits``) and leaves it pending for ever, holding its
run folder. The `slurm` tests ask the sandbox's controller: its one node has the machine's CPUs and 90% of
its memory, no GPUs; ``debug`` is the default partition (no time limit), ``short`` allows 60 minutes.
"""

from __future__ import annotations

import shutil

import pytest

from sdcluster.cluster.backends import slurm_queries as scheduler
from sdcluster.cluster.backends.slurm_checks import LIMITS, check_partition_limits
from sdcluster.cluster.preflight import preflight
from sdcluster.config import ClusterConfig, ConfigError
from tests.sandbox.layout import saved
from tests.slurm_helpers import launch

SLURM = ["+cluster=slurm", "task=train"]


@pytest.fixture
def node(slurm_cluster):
    """The sandbox's node as slurm.conf declares it (CPUs, RealMemory)."""
    return saved(slurm_cluster.state_dir).nodes[0]


@pytest.mark.slurm
def test_more_nodes_than_the_partition_has_are_refused(slurm_cluster, make_cfg):
    with pytest.raises(
        ConfigError,
        match=r"^cluster.nodes: got 1000000, but partition 'debug' has 1 node\(s\) \(TotalNodes\)\. "
        r"Fix: cluster.nodes=1 or fewer, or another partition",
    ):  # no cluster.partition: the default partition's limits
        preflight(make_cfg([*SLURM, "cluster.nodes=1000000"]), dry_run=True)
    with pytest.raises(ConfigError, match=r"^cluster.nodes: got 2, but partition 'short' has 1 node"):
        preflight(make_cfg([*SLURM, "cluster.partition=short", "cluster.nodes=2"]))


@pytest.mark.slurm
def test_a_time_limit_above_the_partitions_is_refused(slurm_cluster, make_cfg):
    over = [*SLURM, "cluster.partition=short", "cluster.timeout_min=61"]
    with pytest.raises(
        ConfigError,
        match=r"^cluster.timeout_min: got 61, but partition 'short' allows 60 minutes \(MaxTime\)\. "
        r"Fix: cluster.timeout_min=60 or less",
    ):
        preflight(make_cfg(over), dry_run=True)
    assert preflight(make_cfg([*SLURM, "cluster.partition=short", "cluster.timeout_min=60"]))[1] == []
    assert preflight(make_cfg([*SLURM, "cluster.timeout_min=100000"]))[1] == []  # debug: MaxTime=INFINITE


@pytest.mark.slurm
def test_more_memory_per_node_than_a_node_has_is_refused(slurm_cluster, make_cfg, node):
    too_much = (node.memory_mb + 1) / 1024
    with pytest.raises(
        ConfigError,
        match=rf"^cluster.mem_gb: got {too_much} \({node.memory_mb + 1} MB per node\), but partition "
        rf"'debug' allows {node.memory_mb} MB per node \(its largest node's RealMemory\)\. "
        r"Fix: cluster.mem_gb=",
    ):
        preflight(make_cfg([*SLURM, f"cluster.mem_gb={too_much}"]), dry_run=True)
    assert preflight(make_cfg([*SLURM, f"cluster.mem_gb={node.memory_mb / 1024}"]))[1] == []


@pytest.mark.slurm
def test_gpus_on_a_partition_without_any_are_refused(slurm_cluster, make_cfg):
    with pytest.raises(
        ConfigError,
        match=r"^cluster.gpus_per_node: got 1, but no node of partition 'debug' has more than 0 GPU\(s\) "
        r"\(Gres\)\. Fix: cluster.gpus_per_node=0 or fewer, or another partition",
    ):
        preflight(make_cfg([*SLURM, "cluster.gpus_per_node=1"]), dry_run=True)


@pytest.mark.slurm
def test_more_cpus_per_node_than_a_node_has_are_refused(slurm_cluster, make_cfg, node):
    n = node.cpus
    with pytest.raises(
        ConfigError,
        match=rf"^cluster.cpus_per_task: {n} CPU\(s\) per task x 2 task\(s\) per node = {2 * n}, but no node "
        rf"of partition 'debug' has more than {n} CPUs\. Fix: at most {n} CPUs per node",
    ):
        preflight(make_cfg([*SLURM, f"cluster.cpus_per_task={n}", "cluster.tasks_per_node=2"]), dry_run=True)
    with pytest.raises(ConfigError, match=rf"^cluster.tasks_per_node: 1 CPU\(s\) per task x {n + 1} task"):
        preflight(make_cfg([*SLURM, f"cluster.tasks_per_node={n + 1}"]))  # one CPU each at the least
    assert preflight(make_cfg([*SLURM, f"cluster.cpus_per_task={n}"]))[1] == []


@pytest.mark.slurm
def test_a_submission_the_partition_cannot_run_queues_nothing(
    slurm_cluster, tmp_path, cache_root, tiny_model
):
    """The whole launch, not only the preflight: exit code 2, the message, no job, no jobs/ folder."""
    proc, ids = launch(tmp_path, cache_root, "task=train", "cluster.nodes=1000000")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sdcluster: configuration error: cluster.nodes: got 1000000, but partition 'debug'" in proc.stderr
    assert ids == {} and "Traceback" not in proc.stderr
    assert not (tmp_path / "jobs").exists()


@pytest.mark.slurm
def test_limits_that_cannot_be_read_are_listed_as_not_checked(slurm_cluster, make_cfg, tmp_path, monkeypatch):
    """A controller that answers sinfo but whose limits cannot be read (no scontrol here): the job is not
    refused on a guess, and the dry run says what it did not check."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in scheduler.CLIENTS:  # the real clients, all but scontrol
        (bin_dir / tool).symlink_to(shutil.which(tool))
    monkeypatch.setenv("PATH", str(bin_dir))  # bash is found at /bin/bash without PATH
    _, (note,) = preflight(make_cfg([*SLURM, "cluster.nodes=1000000"]), dry_run=True)
    assert note.startswith(LIMITS) and "scontrol" in note


def test_without_a_controller_the_dry_run_lists_the_limits_as_not_checked(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))
    _, (note,) = preflight(make_cfg([*SLURM, "cluster.nodes=1000000"]), dry_run=True)
    assert "the cluster itself" in note and "nodes, time limit, memory, CPUs and GPUs per node" in note
    with pytest.raises(ConfigError, match=r"^cluster=slurm: `sbatch` is not on PATH"):
        preflight(make_cfg([*SLURM, "cluster.nodes=1000000"]))  # a real submission stops here


# What the controller's output looks like (SLURM 22.05, `scontrol -o show partition`); the sandbox above
# covers the reader end to end, these the shapes it cannot produce.
GPU_LINE = (
    "PartitionName=gpu AllowGroups=ALL Default=NO MaxNodes=4 MaxTime=2-00:00:00 MinNodes=0 Nodes=g[1-8] "
    "State=UP TotalCPUs=512 TotalNodes=8 DefMemPerCPU=4000 MaxMemPerCPU=8000 TRES=cpu=512,node=8"
)


def test_the_reader_knows_slurms_shapes():
    (fields,) = scheduler.parse_partitions(GPU_LINE).values()
    assert fields["MaxNodes"] == "4" and fields["TRES"] == "cpu=512,node=8"
    assert scheduler.parse_seconds("2-00:00:00") == 2 * 86400
    assert scheduler.parse_seconds("01:00:00") == scheduler.parse_seconds("60") == 3600
    assert scheduler.parse_seconds("1-2") == 26 * 3600 and scheduler.parse_seconds("5:30") == 330
    assert scheduler.parse_seconds("UNLIMITED") is None and scheduler.parse_seconds("INFINITE") is None
    assert scheduler.parse_gpus("(null)") == 0 and scheduler.parse_gpus("gpu") == 1
    assert scheduler.parse_gpus("gpu:a100:2(S:0,1),gpu:v100:2,shard:8") == 4  # a comma inside the binding


def _gpu_partition() -> scheduler.Partition:
    """Eight nodes, only two of them with 8 GPUs and 1 TB (a heterogeneous partition)."""
    big = [scheduler.NodeSize(f"g{k}", 64, 1_000_000, 8) for k in (1, 2)]
    small = [scheduler.NodeSize(f"g{k}", 64, 250_000, 4) for k in range(3, 9)]
    return scheduler.Partition("gpu", 8, 4, 2 * 86400, None, 8000, (*big, *small))


def test_partition_limits_that_the_sandbox_does_not_set():
    part = _gpu_partition()
    check_partition_limits(ClusterConfig(name="slurm", nodes=4, gpus_per_node=4, mem_gb=200), part)
    check_partition_limits(ClusterConfig(name="slurm", nodes=2, gpus_per_node=8, mem_gb=500), part)
    with pytest.raises(ConfigError, match=r"^cluster.nodes: got 5, but partition 'gpu' allows 4 per job"):
        check_partition_limits(ClusterConfig(name="slurm", nodes=5), part)
    with pytest.raises(ConfigError, match=r"allows 512000 MB per node \(MaxMemPerCPU x the node's CPUs\)"):
        check_partition_limits(ClusterConfig(name="slurm", mem_gb=600), part)
    with pytest.raises(
        ConfigError,
        match=r"^cluster.nodes: got 3 of 8 CPUs, 0 MB and 8 GPUs each, but only 2 node\(s\) of partition "
        r"'gpu' have that much\. Fix: cluster.nodes=2 or fewer",
    ):
        check_partition_limits(ClusterConfig(name="slurm", nodes=3, gpus_per_node=8), part)
