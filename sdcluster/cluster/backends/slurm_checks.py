"""What the SLURM backend checks on the login node before anything is queued: the keys only it reads, whether
this is a login node, what the config asks of SLURM, the job script keeps its shape, sbatch is there, the
controller answers, the partition exists and can run the job. Each check names the fix.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from sdcluster.cluster.backends import slurm_queries as queries
from sdcluster.config.checks import ConfigError
from sdcluster.config.cluster import job_key

if TYPE_CHECKING:
    from sdcluster.config import ClusterConfig, Config

SLURM_ONLY = (
    "partition",
    "account",
    "qos",
    "nodes",
    "tasks_per_node",
    "cpus_per_task",
    "mem_gb",
    "constraint",
    "exclude",
    "signal_delay_s",
    "max_requeues",
    "max_timeouts",
    "max_failures",
    "setup",
    "additional_parameters",
    "array_parallelism",
)
"""``cluster.*`` keys only a SLURM job uses (the local executor reads timeout_min and gpus_per_node, the
generation job's too: ``cluster.generate`` is not listed)."""

SLURM_CONF = "/etc/slurm/slurm.conf"
"""Where SLURM's clients read the cluster's config when ``SLURM_CONF`` is not set."""


def login_node(environ: Mapping[str, str]) -> str | None:
    """Why this machine looks like a SLURM login node (sbatch and a readable SLURM config, not inside a job),
    or None."""
    if environ.get("SLURM_JOB_ID"):
        return None
    sbatch = shutil.which("sbatch", path=environ.get("PATH", os.defpath))
    conf = environ.get("SLURM_CONF") or SLURM_CONF
    if sbatch is None or not (Path(conf).is_file() and os.access(conf, os.R_OK)):
        return None
    return f"sbatch is {sbatch}, the SLURM config {conf} is readable, and this is not a SLURM job"


_SBATCH_OPTION = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")  # sbatch's long options: mail-type, gres


def check_config(cfg: Config) -> None:
    """What SLURM needs of the config alone: sbatch option names in ``additional_parameters`` (keys come
    from YAML too, where any string can be a key), a warning signal due before the time limit (SLURM sends
    it; one due at or before the start never leaves time to checkpoint: each job's own limit), and GPUs for
    mixed precision."""
    c = cfg.cluster
    for option in c.additional_parameters:
        if not (isinstance(option, str) and _SBATCH_OPTION.fullmatch(option)):
            raise ConfigError(
                f"cluster.additional_parameters.{option}: is not an sbatch option name. Fix: use sbatch's "
                "long option name without the leading dashes, e.g. mail-type or gres"
            )
    for kind, job in c.jobs(cfg.task).items():
        limit_s, key = job.timeout_min * 60, _key(c, kind, "timeout_min")
        if c.signal_delay_s >= limit_s:
            raise ConfigError(
                f"cluster.signal_delay_s: got {c.signal_delay_s}, must be below the time limit "
                f"({key}={job.timeout_min}: {limit_s} s). Fix: a few minutes under it, e.g. "
                f"cluster.signal_delay_s={min(120, limit_s // 2)}, or a longer {key}"
            )
    if cfg.train.mixed_precision != "no" and c.gpus_per_node == 0:
        raise ConfigError(
            f"train.mixed_precision={cfg.train.mixed_precision} needs GPUs but cluster.gpus_per_node=0. "
            "Fix: set cluster.gpus_per_node, or train.mixed_precision=no on CPU nodes"
        )


def check_script(kind: str, script: str) -> None:
    """The rendered sbatch script parses (``bash -n``) and every ``#SBATCH`` directive stands before the
    first command (sbatch silently ignores directives after one)."""
    bash = shutil.which("bash") or "/bin/bash"  # sbatch runs the script with bash (its #! line)
    parsed = subprocess.run([bash, "-n"], input=script, capture_output=True, text=True, timeout=30)
    if parsed.returncode != 0:
        raise ConfigError(
            f"cluster.setup: the {kind} job script would not parse ({parsed.stderr.strip()}). "
            "Fix: balance the quotes and brackets of the cluster.setup lines"
        )
    lines = [line.strip() for line in script.splitlines() if line.strip()]
    first_command = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    late = [line for line in lines[first_command:] if line.startswith("#SBATCH")]
    if late:
        raise ConfigError(
            f"cluster: {late[0]!r} would come after a command in the {kind} job script, where sbatch "
            "ignores it. Fix: remove line breaks from the cluster values"
        )


def check_cluster(cfg: Config, dry_run: bool) -> list[str]:
    """:func:`check_slurm`; a dry run goes on without a reachable controller and says what it left out."""
    try:
        return check_slurm(cfg)
    except ConfigError as err:
        if not dry_run or not err.args[0].startswith("cluster=slurm:"):  # only an unreachable controller
            raise
        return [f"the cluster itself (partition name; {LIMITS}): {err}"]


def check_slurm(cfg: Config) -> list[str]:
    """sbatch present, controller answering, partition known, the job within the partition's limits: the
    things users get wrong first. Returns what could not be checked (the limits, when only they are
    unreadable); raises :class:`ConfigError` starting ``cluster=slurm:`` when the controller is out of
    reach."""
    try:
        partitions = queries.partitions()
    except queries.SchedulerUnavailable as err:
        if "not on PATH" in str(err):
            raise ConfigError(
                f"cluster=slurm: {err}. Fix: run from a login node of the cluster "
                "(or `module load slurm`), or use the local executor (drop +cluster=slurm)"
            ) from None
        raise ConfigError(
            f"cluster=slurm: {err}. Fix: check SLURM_CONF and that slurmctld is up (`scontrol ping`)"
        ) from None
    unchecked: list[str] = []
    for kind, job in cfg.cluster.jobs(cfg.task).items():  # each job with its own size and partition
        key = _key(cfg.cluster, kind, "partition")
        if job.partition and job.partition not in partitions:
            raise ConfigError(
                f"{key}: {job.partition!r} is not a partition of this cluster. "
                f"Fix: use one of {', '.join(partitions)}"
            )
        try:
            limits = queries.partition(job.partition)
        except queries.SchedulerUnavailable as err:
            unchecked.append(f"{LIMITS}: {err}")
            continue
        if limits is None:  # sbatch would refuse it: "No partition specified or system default partition"
            raise ConfigError(
                f"{key}: not set and this cluster has no default partition. "
                f"Fix: {key}=NAME, one of {', '.join(partitions)}"
            )
        check_partition_limits(job, limits, kind)
    return list(dict.fromkeys(unchecked))  # once, though both jobs could not be checked


def _key(c: ClusterConfig, kind: str, name: str) -> str:
    """The key that set ``name`` of the job of ``kind``: a generation job's null inherits the training's
    value (partition, time limit, CPUs), so the key the user set is the training's."""
    inherited = kind == "generate" and getattr(c.generate, name, None) is None and name in _INHERITED
    return f"cluster.{name}" if inherited else job_key(kind, name)


_INHERITED = ("partition", "timeout_min", "cpus_per_task")  # what cluster.generate.* null takes as is


LIMITS = "the job against the partition's limits (nodes, time limit, memory, CPUs and GPUs per node)"


def _refuse(key: str, asked: str, limit: str, fix: str) -> None:
    raise ConfigError(f"{key}: {asked}, but {limit}. Fix: {fix}")


def check_partition_limits(c: ClusterConfig, part: queries.Partition, kind: str = "train") -> None:
    """Refuse a job the partition can never run: sbatch would refuse some, and the others would pend for
    ever, holding the run folder. ``c`` is the job of ``kind`` as submitted (``ClusterConfig.for_job``):
    the generation job is checked with its own sizes, and its fixes name ``cluster.generate.*``."""
    k = functools.partial(job_key, kind)  # the key each refusal and fix names, for this job
    where = f"partition {part.name!r}" + (" (the generation job's)" if kind == "generate" else "")
    other = f"or another partition ({k('partition')}=NAME)"
    if c.nodes > part.total_nodes:
        _refuse(
            k("nodes"),
            f"got {c.nodes}",
            f"{where} has {part.total_nodes} node(s) (TotalNodes)",
            f"{k('nodes')}={part.total_nodes} or fewer, {other}",
        )
    if part.max_nodes is not None and c.nodes > part.max_nodes:
        _refuse(
            k("nodes"),
            f"got {c.nodes}",
            f"{where} allows {part.max_nodes} per job (MaxNodes)",
            f"{k('nodes')}={part.max_nodes} or fewer, {other}",
        )
    if part.max_time_s is not None and c.timeout_min * 60 > part.max_time_s:
        most = part.max_time_s // 60
        _refuse(
            k("timeout_min"),
            f"got {c.timeout_min}",
            f"{where} allows {most} minutes (MaxTime)",
            f"{k('timeout_min')}={most} or less (a job requeues itself at the limit), {other}",
        )
    _check_node_size(c, part, where, other, k)


def _check_node_size(
    c: ClusterConfig, part: queries.Partition, where: str, other: str, k: Callable[[str], str]
) -> None:
    """What one node must hold: its GPUs, CPUs (per task x tasks) and memory, against the partition's
    biggest node, then against how many of its nodes hold all of it at once."""
    cpus = (c.cpus_per_task or 1) * c.processes_per_node  # SLURM gives a task 1 CPU unless told more
    mem_mb = int(c.mem_gb * 1024) if c.mem_gb else 0  # null: the partition's default, nothing to check
    most = queries.NodeSize(
        "the largest",
        cpus=max((n.cpus for n in part.nodes), default=0),
        memory_mb=max((n.memory_mb for n in part.nodes), default=0),
        gpus=max((n.gpus for n in part.nodes), default=0),
    )
    if c.gpus_per_node > most.gpus:
        _refuse(
            k("gpus_per_node"),
            f"got {c.gpus_per_node}",
            f"no node of {where} has more than {most.gpus} GPU(s) (Gres)",
            f"{k('gpus_per_node')}={most.gpus} or fewer, {other} with GPUs",
        )
    if cpus > most.cpus:
        key = k("cpus_per_task") if c.cpus_per_task else k(_tasks_name(c))
        _refuse(
            key,
            f"{c.cpus_per_task or 1} CPU(s) per task x {c.processes_per_node} task(s) per node = {cpus}",
            f"no node of {where} has more than {most.cpus} CPUs",
            f"at most {most.cpus} CPUs per node in all ({k('cpus_per_task')} x tasks), {other}",
        )
    mem_limits = [(most.memory_mb, "its largest node's RealMemory")]
    if part.max_mem_per_node_mb is not None:
        mem_limits.append((part.max_mem_per_node_mb, "MaxMemPerNode"))
    if part.max_mem_per_cpu_mb is not None:  # SLURM may add CPUs to fit, but never past a node's CPUs
        mem_limits.append((part.max_mem_per_cpu_mb * most.cpus, "MaxMemPerCPU x the node's CPUs"))
    for limit_mb, name in mem_limits:
        if mem_mb > limit_mb:
            _refuse(
                k("mem_gb"),
                f"got {c.mem_gb} ({mem_mb} MB per node)",
                f"{where} allows {limit_mb} MB per node ({name})",
                f"{k('mem_gb')}={math.floor(limit_mb / 1024 * 100) / 100} or less "
                f"(null: the partition's default), {other}",
            )
    fit = [n for n in part.nodes if n.cpus >= cpus and n.memory_mb >= mem_mb and n.gpus >= c.gpus_per_node]
    if len(fit) < c.nodes:
        _refuse(
            k("nodes"),
            f"got {c.nodes} of {cpus} CPUs, {mem_mb} MB and {c.gpus_per_node} GPUs each",
            f"only {len(fit)} node(s) of {where} have that much",
            f"{k('nodes')}={len(fit)} or fewer, smaller nodes, {other}",
        )


def _tasks_name(c: ClusterConfig) -> str:
    return "gpus_per_node" if c.gpus_per_node else "tasks_per_node"
