"""The CPU thread count chosen by distributed.setup survives accelerate's multi-CPU start."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.conftest import REPO

# One rank of a 2-process gloo run with one process on its "node" (LOCAL_WORLD_SIZE=1), as on two nodes x one
# task: there accelerate used to set threads = physical cores / 1, whatever the job was given.
_RANK = """
import os, sys, torch
from sdcluster.runtime import distributed
distributed.setup(use_gpus=False)
os.environ.update(RANK=sys.argv[1], WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
from accelerate import Accelerator
acc = Accelerator(cpu=True)
print(acc.num_processes, torch.get_num_threads(), distributed.threads_chosen(), os.environ["OMP_NUM_THREADS"])
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_keeps_the_thread_count_of_the_allocation() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["SLURM_CPUS_PER_TASK"] = "1"  # what cluster.cpus_per_task=1 gives each task
    port = str(_free_port())
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK, str(rank), port],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [rank.communicate(timeout=120) for rank in ranks]
    for rank, (out, err) in zip(ranks, outputs, strict=True):
        assert rank.returncode == 0, err
        assert out.split() == ["2", "1", "1", "1"], (out, err)


def test_the_rendezvous_port_is_the_jobs_own_and_outside_the_ephemeral_range() -> None:
    from sdcluster.runtime.distributed import RENDEZVOUS_PORTS, rendezvous_port

    ports = {rendezvous_port(job) for job in ["5256095", "5256096", "5256095_0", "5256095_1", "17"]}
    assert len(ports) == 5 and all(RENDEZVOUS_PORTS[0] <= p <= RENDEZVOUS_PORTS[1] < 32768 for p in ports)
    assert rendezvous_port("5256095") == rendezvous_port("5256095")  # every rank, every requeue
