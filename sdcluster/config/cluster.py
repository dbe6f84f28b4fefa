"""The ``cluster`` group (``conf/cluster/``, appended with ``+cluster=...``): where jobs run."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from sdcluster.config.checks import Schema, _choice, _no_control, _require
from sdcluster.config.store import options

CLUSTERS = options("cluster")
"""``cluster.name``: the executors, one option file each in ``conf/cluster/`` (the config tree mirrors the
backends of :mod:`sdcluster.cluster.backends`, which this layer below them cannot import; a test keeps the
two in step)."""

_MAX_SIGNAL_DELAY_S = 65535  # sbatch --signal: "sig_time must have an integer value between 0 and 65535"


TASK_JOBS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "generate": ("generate",),
    "train_generate": ("train", "generate"),
    "cache": ("cache",),
}
"""``task`` -> the kinds of job it submits, in submission order; a later job waits on the earlier one of its
point. Each kind runs with its own resources (:meth:`ClusterConfig.for_job`)."""


def _at_least(value: int, key: str, low: int, fix: str) -> None:
    _require(value >= low, key, f"got {value}, must be >= {low}", fix)


def _check_mem_gb(value: float | None, key: str) -> None:
    if value is not None:
        # sbatch reads --mem=0 as "all the node's memory", and submit writes whole MB: under 1 MB is 0
        _require(
            math.isfinite(value) and value * 1024 >= 1,
            key,
            f"got {value}, must be > 0 GB per node (at least 1 MB, 1/1024)",
            "e.g. 64, or null for the partition's default",
        )


def job_key(kind: str, name: str) -> str:
    """The key a user sets for setting ``name`` of the job of ``kind`` (``cluster.generate.nodes`` for the
    generation job's nodes, ``cluster.account`` for anyone's account): what the checks name in a fix."""
    own = kind == "generate" and name in {f.name for f in dataclasses.fields(GenerationResources)}
    return f"cluster.generate.{name}" if own else f"cluster.{name}"


@dataclass
class GenerationResources(Schema):
    """What each shard of the generation job asks for (``cluster.generate.*``): sized for rendering images,
    not like the training job. The tasks of a latent-cache build (``task=cache``) run frozen encoders and are
    sized by these too. Account, qos, constraint, exclude, setup lines, the warning signal and the
    requeue budgets are the training's (``cluster.*``)."""

    nodes: int = 1
    """Nodes per generation shard (each array task); its processes split the shard's images."""
    gpus_per_node: int | None = None
    """GPUs per node of a generation shard, one process each; null: 1 when the training asks for GPUs
    (cluster.gpus_per_node > 0), else 0 (CPU nodes)."""
    tasks_per_node: int = 1
    """Processes per node of a generation shard on CPU nodes; with GPUs there is one per GPU."""
    cpus_per_task: int | None = None
    """CPUs per generation process; null: cluster.cpus_per_task, what one training process gets (on CPU
    nodes also the torch thread count, which the generated images' bytes depend on)."""
    mem_gb: float | None = None
    """Memory per node of a generation shard in GB (> 0); null: the partition's default (cluster.mem_gb is
    sized for the training's processes and is not inherited)."""
    timeout_min: int | None = None
    """Time limit of each generation shard in minutes; null: cluster.timeout_min."""
    partition: str | None = None
    """SLURM partition of the generation job; null: cluster.partition."""

    def __post_init__(self) -> None:
        key = "cluster.generate."
        _at_least(self.nodes, f"{key}nodes", 1, "e.g. 1")
        _at_least(self.tasks_per_node, f"{key}tasks_per_node", 1, "e.g. 1")
        if self.gpus_per_node is not None:
            _at_least(self.gpus_per_node, f"{key}gpus_per_node", 0, "e.g. 1, or null: as the training")
        if self.cpus_per_task is not None:
            _at_least(self.cpus_per_task, f"{key}cpus_per_task", 1, "e.g. 8, or null: as the training")
        _check_mem_gb(self.mem_gb, f"{key}mem_gb")
        if self.timeout_min is not None:
            _at_least(self.timeout_min, f"{key}timeout_min", 1, "minutes, e.g. 240, or null: as the training")
        _no_control(self.partition, f"{key}partition")


@dataclass
class ClusterConfig(Schema):
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
    gpu_mem_gb: float | None = None
    """Memory of each GPU in GiB (e.g. 80): a training job whose memory plan (python -m sdcluster.plan) is
    above it is refused before the queue, with the cheapest change that fits; null: no check. The plan
    leaves out the CUDA context and the allocator's slack (about 1 GiB): give a little less than the card."""
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
    max_failures: int = 2
    """Requeues after a failure (a rank that died, a node that failed, an error in the job) a job may use
    before it stops; each resumes from the newest complete checkpoint. A failure at the same step as the
    previous one (a bug, bad data) is not requeued. 0: a failed job stays failed."""
    setup: list[str] = field(default_factory=list)
    """Shell lines the job script runs before Python, e.g. ["module load cuda", "source env/bin/activate"]."""
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    """Other sbatch options by their long name, e.g. {mail-type: END}."""
    array_parallelism: int = 16
    """At most this many tasks of a job array (sweep points, generation shards) run at once (>= 1)."""
    share_jobs_with_group: bool = False
    """jobs/ (scripts, logs, the pickles submitit loads) readable by your group too (0750), not only you."""
    generate: GenerationResources = field(default_factory=GenerationResources)
    """What each generation shard asks for (cluster.generate.*); the keys above size the training job."""

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
        _check_mem_gb(self.mem_gb, "cluster.mem_gb")
        _require(
            self.gpu_mem_gb is None or (math.isfinite(self.gpu_mem_gb) and self.gpu_mem_gb > 0),
            "cluster.gpu_mem_gb",
            f"got {self.gpu_mem_gb}, must be > 0 GiB",
            "each GPU's memory, e.g. 80 (or 79 to leave room for the CUDA context), or null for no check",
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
        _at_least(self.max_failures, "cluster.max_failures", 0, "e.g. 2, or 0: never requeue a failed job")

    @property
    def processes_per_node(self) -> int:
        """One process per GPU when GPUs are asked for, else ``tasks_per_node`` (CPU nodes)."""
        return self.gpus_per_node if self.gpus_per_node > 0 else self.tasks_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node

    def for_job(self, kind: str) -> ClusterConfig:
        """The settings the job of ``kind`` runs with: the training's are these; the generation job's take
        :attr:`generate`'s sizes over them (null ones as documented there). Applied twice, the same."""
        if kind not in ("generate", "cache"):  # a cache shard runs frozen encoders: sized like generation
            return self
        g = self.generate
        gpus = (1 if self.gpus_per_node > 0 else 0) if g.gpus_per_node is None else g.gpus_per_node
        return dataclasses.replace(
            self,
            nodes=g.nodes,
            tasks_per_node=g.tasks_per_node,
            gpus_per_node=gpus,
            cpus_per_task=self.cpus_per_task if g.cpus_per_task is None else g.cpus_per_task,
            mem_gb=g.mem_gb,
            timeout_min=self.timeout_min if g.timeout_min is None else g.timeout_min,
            partition=self.partition if g.partition is None else g.partition,
        )

    def jobs(self, task: str) -> dict[str, ClusterConfig]:
        """Each kind of job ``task`` submits -> the settings it runs with, in submission order."""
        return {kind: self.for_job(kind) for kind in TASK_JOBS[task]}
