"""The scheduler's environment -> torch.distributed environment, before the Accelerator exists.

accelerate has no scheduler detection of its own: it reads MASTER_ADDR/PORT, RANK, WORLD_SIZE and
LOCAL_RANK. submitit knows them from the scheduler (node list, task ids) and exports them
(``TorchDistributedEnvironment``); the
port is ours (:func:`rendezvous_port`): derived from the job id, so ranks agree without talking and a
requeued job reuses it.
The GPUs are the ones the scheduler bound to the task (:func:`gpu_binding`), not submitit's local-rank guess.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from sdcluster.cluster import backends
from sdcluster.cluster.backends.base import BoundGpus
from sdcluster.derive import derive_int

log = logging.getLogger("sdcluster")


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    job_id: str | None
    restart_count: int
    threads: int
    device: int | None = None  # this process's GPU among those it sees (cuda:<device>); None without GPUs


@dataclass(frozen=True)
class GpuBinding:
    """What a process exports so that torch and accelerate use the GPU its task was given."""

    visible: str  # CUDA_VISIBLE_DEVICES: the scheduler's own list for the task, never renumbered here
    device: int  # the index of this process's GPU in ``visible``: cuda:<device>


def gpu_binding(gpus: BoundGpus | None) -> GpuBinding | None:
    """The devices a task's process sees and the one it uses, from what the scheduler bound to the task.

    When every task of the node sees the step's GPUs (no ``--gpu-bind``, or ``--gpu-bind=none``; the
    node's numbers without cgroup confinement, 0..n-1 with it), task k takes the k-th of them: a job given
    GPUs 4-7 runs task k on GPU 4+k. When each task sees only its own (``--gpu-bind=single:1``,
    ``--gpus-per-task``, or cgroups per task), it takes the first. The list stays as the scheduler set it:
    submitit's rewrite to the local rank named another job's GPU on nodes without confinement, and no GPU
    at all for a task confined to its own.
    """
    if gpus is None or not gpus.visible:
        return None
    tasks = max(1, gpus.tasks_on_node)
    shared = len(gpus.visible) >= max(tasks, gpus.on_node or 0) and gpus.local_id < len(gpus.visible)
    return GpuBinding(",".join(gpus.visible), gpus.local_id if shared and tasks > 1 else 0)


def _submitit_env():
    try:
        import submitit

        return submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (tests, plain python)
        return None


RENDEZVOUS_PORTS = (20000, 32767)
"""Where rank 0's rendezvous port is drawn from: below Linux's ephemeral range (32768-60999 by default)."""


def rendezvous_port(job_id: str) -> int:
    """The rendezvous port of a job (an array task has its own id, so its own port), the same on every rank.

    submitit draws it from 20000-60000, which overlaps the ephemeral range: a port that an outgoing
    connection on the node happens to hold makes rank 0's store fail with EADDRINUSE while the other ranks
    wait for it (seen in our own suite). A port below that range is taken only by a listening server.
    """
    low, high = RENDEZVOUS_PORTS
    return low + derive_int(job_id, byteorder="little") % (high - low + 1)


THREADS_ENV = "OMP_NUM_THREADS"  # where the chosen count is published: accelerate and child processes read it
_chosen: int | None = None  # what setup() chose in this process, for the attempt record


def cpu_threads(processes_on_node: int) -> int:
    """Threads for torch: the job's CPU allocation, not the node's cores, not 1.

    The CPUs the scheduler gave this task (``cluster.cpus_per_task``) are the same whatever the layout of
    the job; without them, the CPUs this process may run on shared by the processes of this node.
    """
    per_task = backends.environment().cpus_per_task
    if per_task:
        return max(1, per_task)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, usable // max(1, processes_on_node))


def bind_gpus(use_gpus: bool) -> GpuBinding | None:
    """Export the GPUs this task was given (:func:`gpu_binding`), before torch initialises CUDA: the CUDA
    runtime reads ``CUDA_VISIBLE_DEVICES`` once, at its first call, and ignores it afterwards. GPUs that a
    site binds to a job that asked for none are bound the same way: torch uses any GPU it sees."""
    job = backends.environment()
    binding = gpu_binding(job.gpus)
    if binding is None:
        # a CUDA_VISIBLE_DEVICES of the submitting shell is the user's (and a local job's, submitit's own)
        if use_gpus and job.inside:
            log.warning("the scheduler bound no GPU to this task; CUDA_VISIBLE_DEVICES left as it is")
        return None
    torch = sys.modules.get("torch")
    if os.environ.get("CUDA_VISIBLE_DEVICES") != binding.visible and torch and torch.cuda.is_initialized():
        raise RuntimeError("CUDA was initialised before the task's GPUs were bound: it would ignore them")
    os.environ["CUDA_VISIBLE_DEVICES"] = binding.visible
    return binding


def setup(use_gpus: bool) -> DistInfo:
    """Bind this process's GPU, export the rendezvous and size torch's thread pool; log what was chosen."""
    binding = bind_gpus(use_gpus)
    import torch

    env = _submitit_env()
    restart = backends.environment().restart_count
    if env is None or env.num_tasks == 1:
        info = DistInfo(0, 0, 1, env.job_id if env else None, restart, cpu_threads(1))
    else:
        from submitit.helpers import TorchDistributedEnvironment

        # a MASTER_PORT of the submitting shell (sbatch passes the environment on) is the user's choice
        os.environ.setdefault("MASTER_PORT", str(rendezvous_port(str(env.job_id))))
        # submitit's CUDA_VISIBLE_DEVICES would be the local rank: bind_gpus has set the task's own
        dist = TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        info = DistInfo(
            dist.rank,
            dist.local_rank,
            dist.world_size,
            env.job_id,
            restart,
            cpu_threads(dist.local_world_size),
        )
        log.info(
            "rendezvous %s:%s rank %d/%d", dist.master_addr, dist.master_port, info.rank, info.world_size
        )
    if binding:
        _use_device(binding, info, torch)
    if not use_gpus:
        # accelerate's multi-CPU start sets torch's thread count itself whenever OMP_NUM_THREADS is unset:
        # the machine's physical cores / the processes on this node. That overrode the count chosen here,
        # and differed between layouts of one world size (2 nodes x 1 task: 2 threads on a 2-core machine;
        # 1 node x 2 tasks: 1). CPU kernels split their float reductions by thread, so the two layouts
        # ended 5e-5 apart in the weights (and built latent caches apart by 1e-6). Exported, it is kept.
        global _chosen
        os.environ[THREADS_ENV] = str(info.threads)
        torch.set_num_threads(info.threads)
        _chosen = info.threads
    log.info("torch threads: %d (from the job's CPU allocation)", torch.get_num_threads())
    return info


def _use_device(binding: GpuBinding, info: DistInfo, torch: Any) -> None:
    """Make ``binding.device`` the GPU of every library in this process."""
    # accelerate takes LOCAL_RANK as the device ordinal (cuda:<LOCAL_RANK>, and its barrier's device_ids):
    # a task that sees only its own GPU is ordinal 0 whatever its place on the node.
    if "LOCAL_RANK" in os.environ:
        os.environ["LOCAL_RANK"] = str(binding.device)
    info.device = binding.device
    if torch.cuda.is_available():  # after the export above; code that says plain "cuda" gets this GPU
        torch.cuda.set_device(binding.device)
    log.info(
        "GPUs: CUDA_VISIBLE_DEVICES=%s, this process uses cuda:%d (task %d on its node)",
        binding.visible,
        binding.device,
        info.local_rank,
    )


def threads_chosen() -> int | None:
    """The CPU thread count :func:`setup` chose for this process (None on GPUs, or before setup).

    Recorded with each attempt: on CPU, runs repeat bit for bit only at the same thread count.
    """
    return _chosen


def rank0_decides(acc: Any, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (what other ranks pass is ignored).

    For decisions read from shared files: ranks that read a network file system separately may see
    different things, and a collective that only some ranks then call hangs the job.
    """
    if acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]
