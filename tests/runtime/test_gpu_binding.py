"""Each process uses the GPU its task was given, from what SLURM set for the task (issue 21, item 6).

No GPU here: the environments below are the ones SLURM gives a task of a job with 4 GPUs of a node (GPUs 4-7
on nodes without cgroup device confinement, 0-3 as the task sees them with it), one task per GPU, with and
without ``--gpu-bind``. What they must become is the ``CUDA_VISIBLE_DEVICES`` the process exports and the
index of its GPU in it (torch's ``cuda:<index>``); the GPU that names is checked against the one the task was
given. One real job on the CPU sandbox checks the other side: no GPU bound, nothing rewritten.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import submitit

from sdcluster.cluster import backends
from sdcluster.cluster.backends.slurm import bound_gpus
from sdcluster.runtime import distributed
from sdcluster.runtime.distributed import GpuBinding, gpu_binding

NODE_GPUS = "4,5,6,7"  # the job's GPUs of the node, in the node's own numbering


def task_env(local_id: int, visible: str | None, node_id: int = 0, tasks: str = "4", **extra: str) -> dict:
    """A task's environment as SLURM sets it for a step of 4 tasks per node and 4 GPUs per node;
    ``visible``: what SLURM put in CUDA_VISIBLE_DEVICES and GPU_DEVICE_ORDINAL for this task."""
    env = {
        "SLURM_JOB_ID": "812",
        "SLURM_STEP_ID": "0",
        "SLURM_NTASKS": "4" if tasks == "4" else "8",
        "SLURM_JOB_NUM_NODES": "1" if tasks == "4" else "2",
        "SLURM_JOB_NODELIST": "gpu[03-04]",
        "SLURM_NODEID": str(node_id),
        "SLURM_LOCALID": str(local_id),
        "SLURM_PROCID": str(node_id * 4 + local_id),
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_STEP_TASKS_PER_NODE": tasks,
        "SLURM_TASKS_PER_NODE": tasks,
        "SLURM_JOB_GPUS": NODE_GPUS,
        "SLURM_STEP_GPUS": NODE_GPUS,
        "SLURM_GPUS_ON_NODE": "4",
    }
    if visible is not None:
        env.update(CUDA_VISIBLE_DEVICES=visible, GPU_DEVICE_ORDINAL=visible)
    return {**env, **extra}


def binding_of(env: dict) -> GpuBinding | None:
    return gpu_binding(bound_gpus(env))


def used_gpu(binding: GpuBinding) -> str:
    """The device CUDA gives the process: entry ``device`` of its visible list."""
    return binding.visible.split(",")[binding.device]


# (case, CUDA_VISIBLE_DEVICES SLURM sets for task k, the GPU task k must use, as the task's CUDA numbers it)
CASES = [
    # no confinement, no --gpu-bind (or --gpu-bind=none): every task sees the node's GPUs of the job
    ("no cgroup, no --gpu-bind", lambda k: NODE_GPUS, lambda k: str(4 + k)),
    # no confinement, --gpu-bind=single:1 (or map_gpu:4,5,6,7, closest): each task sees only its own
    ("no cgroup, --gpu-bind=single:1", lambda k: str(4 + k), lambda k: str(4 + k)),
    # no confinement, --gpus-per-task=1: SLURM binds each task to its own GPU
    ("no cgroup, --gpus-per-task=1", lambda k: str(4 + k), lambda k: str(4 + k)),
    # cgroup confinement of the step: its 4 GPUs, renumbered 0-3 in every task
    ("cgroup, no --gpu-bind", lambda k: "0,1,2,3", lambda k: str(k)),
    # cgroup confinement with --gpu-bind=single:1: the step's GPUs renumbered, each task given its own
    ("cgroup, --gpu-bind=single:1", lambda k: str(k), lambda k: str(k)),
    # cgroup confinement per task (--gpus-per-task=1): each task sees one GPU, number 0
    ("cgroup per task", lambda k: "0", lambda k: "0"),
]


@pytest.mark.parametrize(("case", "visible", "expected"), CASES, ids=[c[0] for c in CASES])
def test_each_task_uses_the_gpu_slurm_bound_to_it(case, visible, expected) -> None:
    for k in range(4):
        binding = binding_of(task_env(k, visible(k)))
        assert binding is not None, case
        assert binding.visible == visible(k)  # what SLURM set stays as it set it, never renumbered
        assert used_gpu(binding) == expected(k), f"{case}: task {k} uses {used_gpu(binding)}"


def test_tasks_on_the_second_node_count_from_their_own_node() -> None:
    # 2 nodes x 4 tasks: the second node's tasks have global ranks 4-7 but local ids 0-3
    for k in range(4):
        binding = binding_of(task_env(k, NODE_GPUS, node_id=1, tasks="4(x2)"))
        assert binding is not None and used_gpu(binding) == str(4 + k)


def test_submitits_rewrite_is_not_taken_for_slurms_binding() -> None:
    # submitit's helper rewrote CUDA_VISIBLE_DEVICES to the local rank; GPU_DEVICE_ORDINAL is still SLURM's
    env = task_env(1, NODE_GPUS)
    env["CUDA_VISIBLE_DEVICES"] = "1"
    binding = binding_of(env)
    assert binding == GpuBinding(NODE_GPUS, 1) and used_gpu(binding) == "5"


def test_a_site_that_sets_only_slurms_gpu_lists_still_binds() -> None:
    # gres without the device variables: the node's numbers from SLURM_STEP_GPUS, the only ones there are
    env = task_env(2, None)
    binding = binding_of(env)
    assert binding is not None and binding.visible == NODE_GPUS and used_gpu(binding) == "6"


def test_one_task_per_node_uses_the_gpu_it_was_given() -> None:
    env = task_env(0, "6", tasks="1", SLURM_GPUS_ON_NODE="1", SLURM_STEP_GPUS="6", SLURM_JOB_GPUS="6")
    assert binding_of(env) == GpuBinding("6", 0)


def test_no_gpu_bound_leaves_the_users_devices_alone() -> None:
    env = {k: v for k, v in task_env(0, None).items() if "GPU" not in k}
    env["CUDA_VISIBLE_DEVICES"] = "2"  # the submitting shell's, passed on by sbatch: not SLURM's binding
    assert bound_gpus(env) is None and binding_of(env) is None


@pytest.fixture
def slurm_task(monkeypatch: pytest.MonkeyPatch):
    """Make this process a task of a SLURM step that submitit started; the environment is restored
    afterwards as a whole (setup exports MASTER_ADDR, RANK... that monkeypatch never saw: a leftover
    MASTER_ADDR would send every later local job of the suite to that host's rendezvous)."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith(("SLURM_", "SUBMITIT_")) or key in ("CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL"):
            monkeypatch.delenv(key)
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def enter(env: dict) -> None:
        for key, value in {**env, "SUBMITIT_EXECUTOR": "slurm"}.items():  # as submitit's sbatch script sets
            monkeypatch.setenv(key, value)

    yield enter
    os.environ.clear()
    os.environ.update(saved)


def test_setup_exports_slurms_devices_and_the_tasks_index(slurm_task) -> None:
    # task 2 of 4 on a node without confinement: submitit's export would have made it CUDA_VISIBLE_DEVICES=2
    slurm_task(task_env(2, NODE_GPUS))
    assert backends.environment().gpus is not None
    info = distributed.setup(use_gpus=True)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == NODE_GPUS
    assert (info.local_rank, info.device, os.environ["LOCAL_RANK"]) == (2, 2, "2")  # cuda:2 = GPU 6


def test_setup_gives_a_task_bound_to_its_own_gpu_device_zero(slurm_task) -> None:
    # --gpu-bind=single:1: task 3 sees only GPU 7; accelerate takes LOCAL_RANK as its device ordinal
    slurm_task(task_env(3, "7"))
    info = distributed.setup(use_gpus=True)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"
    assert (info.local_rank, info.device, os.environ["LOCAL_RANK"]) == (3, 0, "0")


def _report() -> dict:
    """Inside the job: what the task's environment says of GPUs, before and after the distributed setup."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    info = distributed.setup(use_gpus=True)
    return {
        "gpus": backends.environment().gpus,
        "before": before,
        "after": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "device": info.device,
        "local_rank": info.local_rank,
    }


@pytest.mark.slurm
def test_a_real_job_without_gpus_keeps_cuda_visible_devices(
    slurm_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sbatch passes the submitting shell's environment on; with no GPU bound it stays what it was
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    ex = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    ex.update_parameters(slurm_partition="debug", nodes=1, tasks_per_node=2, cpus_per_task=1, timeout_min=5)
    reports = ex.submit(_report).results()
    assert sorted(r["local_rank"] for r in reports) == [0, 1]
    for report in reports:
        assert report["gpus"] is None and report["device"] is None
        assert report["before"] == report["after"] == "3", report
