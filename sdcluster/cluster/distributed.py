"""SLURM/submitit environment -> torch.distributed environment, before the Accelerator exists.

accelerate has no SLURM detection of its own: it reads MASTER_ADDR/PORT, RANK, WORLD_SIZE and LOCAL_RANK.
submitit knows them from SLURM (node list, task ids); its ``TorchDistributedEnvironment`` derives the port
from the job id, so ranks agree without talking and a requeued job reuses it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("sdcluster")


@dataclass
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    job_id: str | None
    restart_count: int
    threads: int


def _submitit_env():
    try:
        import submitit

        return submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job (tests, plain python)
        return None


def cpu_threads(processes_on_node: int) -> int:
    """Threads for torch: the job's CPU allocation, not the node's cores, not 1.

    ``SLURM_CPUS_PER_TASK`` is what SLURM gave this task; outside SLURM, the CPUs this process may run on
    shared by the processes of this node.
    """
    per_task = os.environ.get("SLURM_CPUS_PER_TASK")
    if per_task and per_task.isdigit():
        return max(1, int(per_task))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, usable // max(1, processes_on_node))


def setup(use_gpus: bool) -> DistInfo:
    """Export the rendezvous for this process and size torch's thread pool; log what was chosen."""
    import torch

    env = _submitit_env()
    restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if env is None or env.num_tasks == 1:
        info = DistInfo(0, 0, 1, env.job_id if env else None, restart, cpu_threads(1))
    else:
        from submitit.helpers import TorchDistributedEnvironment

        dist = TorchDistributedEnvironment().export(set_cuda_visible_devices=use_gpus, overwrite=True)
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
    if not use_gpus:
        torch.set_num_threads(info.threads)
    log.info("torch threads: %d (from the job's CPU allocation)", torch.get_num_threads())
    return info


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
