"""The ``cluster`` group (``conf/cluster/``, appended with ``+cluster=...``): where jobs run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from sdcluster.config.checks import _choice, _no_control, _require
from sdcluster.config.store import options

CLUSTERS = options("cluster")
"""``cluster.name``: the executors, one option file each in ``conf/cluster/`` (the config tree mirrors the
backends of :mod:`sdcluster.cluster.backends`, which this layer below them cannot import; a test keeps the
two in step)."""

_MAX_SIGNAL_DELAY_S = 65535  # sbatch --signal: "sig_time must have an integer value between 0 and 65535"


def _at_least(value: int, key: str, low: int, fix: str) -> None:
    _require(value >= low, key, f"got {value}, must be >= {low}", fix)


@dataclass
class ClusterConfig:
    """Where jobs run. ``local`` runs them in subprocesses here; ``slurm`` submits with sbatch.

    Site facts (partition, account, setup lines) belong in ``conf/cluster/*.yaml`` or the gitignored
    ``conf/local/``, never in Python.
    """

    name: str = "local"
    """The executor: local (a subprocess on this machine) or slurm (sbatch); append with +cluster=slurm."""
    partition: str | None = None
    """SLURM partition to submit to; null: the cluster's default partition."""
    account: str | None = None
    """SLURM account the jobs are charged to; null: your default account."""
    qos: str | None = None
    """SLURM quality of service; null: the default one."""
    nodes: int = 1
    """Nodes per training job; each runs processes_per_node processes."""
    gpus_per_node: int = 0
    """GPUs per node, one process (task) each; 0 on CPU nodes."""
    tasks_per_node: int = 1
    """Processes per node when no GPUs are asked for (CPU nodes); with GPUs there is one per GPU."""
    cpus_per_task: int | None = None
    """CPUs per process (data loading, torch threads); null: the partition's default.

    On CPU nodes it is also each process's torch thread count (recorded with each attempt): results repeat
    bit for bit only at the same count, so set it when runs or layouts must compare bit for bit."""
    mem_gb: float | None = None
    """Memory per node in GB (> 0; sbatch reads 0 as all of the node's); null: the partition's default."""
    timeout_min: int = 600
    """Time limit of each job in minutes; a SLURM job reaching it checkpoints and requeues itself."""
    constraint: str | None = None
    """SLURM node features the job needs (sbatch --constraint), e.g. a GPU type; null: any node."""
    exclude: str | None = None
    """Nodes SLURM must not use (sbatch --exclude), e.g. a broken one; null: none."""
    signal_delay_s: int = 120
    """Seconds before the time limit that SLURM sends USR2, time for the job to checkpoint and requeue;
    below the time limit and at most 65535 (sbatch's bound)."""
    max_requeues: int = 3
    """Requeues after preemption a job may use before it stops."""
    max_timeouts: int = 3
    """Requeues after reaching the time limit a job may use before it stops."""
    setup: list[str] = field(default_factory=list)
    """Shell lines the job script runs before Python, e.g. ["module load cuda", "source env/bin/activate"]."""
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    """Other sbatch options by their long name, e.g. {mail-type: END}."""
    array_parallelism: int = 16
    """At most this many tasks of a job array (sweep points, generation shards) run at once (>= 1)."""
    share_jobs_with_group: bool = False
    """jobs/ (scripts, logs, the pickles submitit loads) readable by your group too (0750), not only you."""

    def __post_init__(self) -> None:
        _choice(self.name, "cluster.name", CLUSTERS)
        self._check_ranges()
        for key in ("partition", "account", "qos", "constraint", "exclude"):
            _no_control(getattr(self, key), f"cluster.{key}")
        for i, line in enumerate(self.setup):
            _no_control(line, f"cluster.setup[{i}]")
        for option, value in self.additional_parameters.items():  # its backend checks the option names
            _no_control(value, f"cluster.additional_parameters.{option}")

    def _check_ranges(self) -> None:
        """Sign and range of every number, whatever the executor: sbatch dies with a traceback on some
        (``--mem=-5120MB``), and others queue jobs that can never do their work (an array that runs no task
        at once). What only one executor needs (a warning signal due before the job's time limit) its
        backend checks (``check_config`` of :mod:`sdcluster.cluster.backends`)."""
        _at_least(self.nodes, "cluster.nodes", 1, "e.g. 1")
        _at_least(self.gpus_per_node, "cluster.gpus_per_node", 0, "0 on CPU nodes, else the GPUs per node")
        _at_least(self.tasks_per_node, "cluster.tasks_per_node", 1, "e.g. 1")
        if self.cpus_per_task is not None:
            _at_least(
                self.cpus_per_task, "cluster.cpus_per_task", 1, "e.g. 8, or null for the partition's default"
            )
        if self.mem_gb is not None:
            # sbatch reads --mem=0 as "all the node's memory", and submit writes whole MB: under 1 MB is 0
            _require(
                math.isfinite(self.mem_gb) and self.mem_gb * 1024 >= 1,
                "cluster.mem_gb",
                f"got {self.mem_gb}, must be > 0 GB per node (at least 1 MB, 1/1024)",
                "e.g. 64, or null for the partition's default",
            )
        _at_least(self.timeout_min, "cluster.timeout_min", 1, "minutes, e.g. 1440")
        _at_least(self.array_parallelism, "cluster.array_parallelism", 1, "e.g. 16")
        _at_least(self.signal_delay_s, "cluster.signal_delay_s", 0, "seconds, e.g. 120")
        _require(  # sbatch's own bound for --signal's time
            self.signal_delay_s <= _MAX_SIGNAL_DELAY_S,
            "cluster.signal_delay_s",
            f"got {self.signal_delay_s}, must be <= {_MAX_SIGNAL_DELAY_S} (sbatch --signal's limit)",
            "seconds, e.g. 120",
        )
        _at_least(self.max_requeues, "cluster.max_requeues", 0, "e.g. 3")
        _at_least(self.max_timeouts, "cluster.max_timeouts", 0, "e.g. 3")

    @property
    def processes_per_node(self) -> int:
        """One process per GPU when GPUs are asked for, else ``tasks_per_node`` (CPU nodes)."""
        return self.gpus_per_node if self.gpus_per_node > 0 else self.tasks_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node
