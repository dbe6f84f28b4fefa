"""Turn the cluster config into a submitit executor, submit jobs, and record them in ``jobs/<id>/``.

Cluster facts come only from ``cfg.cluster`` (YAML); nothing site-specific is written here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import submitit
from omegaconf import OmegaConf

from sdcluster import ledger, paths
from sdcluster.config import Config
from sdcluster.redaction import redact


def slurm_parameters(cfg: Config, name: str, dependency: str | None = None) -> dict[str, Any]:
    """SlurmExecutor parameters (submitit's own names) from ``cfg.cluster``; unset values are left out."""
    c = cfg.cluster
    params: dict[str, Any] = {
        "job_name": name,
        "partition": c.partition,
        "account": c.account,
        "qos": c.qos,
        "time": c.timeout_min,
        "nodes": c.nodes,
        "ntasks_per_node": c.processes_per_node,
        "cpus_per_task": c.cpus_per_task,
        "gpus_per_node": c.gpus_per_node or None,
        "mem": f"{int(c.mem_gb * 1024)}MB" if c.mem_gb else None,
        "constraint": c.constraint,
        "exclude": c.exclude,
        "signal_delay_s": c.signal_delay_s,
        "setup": list(c.setup) or None,
        "additional_parameters": dict(c.additional_parameters) or None,
        "array_parallelism": c.array_parallelism,
        "dependency": dependency,
    }
    return {k: v for k, v in params.items() if v is not None}


def make_executor(cfg: Config, name: str, dependency: str | None = None) -> submitit.Executor:
    folder = paths.submitit_folder(cfg)
    if cfg.cluster.name == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=cfg.cluster.timeout_min, nodes=1, tasks_per_node=1)
        return executor
    # submitit would also count preemptions as time-outs for short limits; our own ledger enforces
    # cluster.max_requeues / max_timeouts, so submitit's counter is only set high enough never to decide.
    budget = cfg.cluster.max_timeouts + cfg.cluster.max_requeues + 1
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=budget)
    executor.update_parameters(**slurm_parameters(cfg, name, dependency))
    return executor


def sbatch_preview(cfg: Config, name: str) -> str:
    """The sbatch script submitit would write, without submitting (``launch.dry_run=true``)."""
    from submitit.slurm.slurm import _make_sbatch_string  # submitit's own renderer, so the preview is exact

    executor = make_executor(cfg, name)
    if cfg.cluster.name == "local":
        return "# local executor: no sbatch script; the job runs in a subprocess on this machine\n"
    command = executor._submitit_command_str
    return _make_sbatch_string(command=command, folder=paths.submitit_folder(cfg), **executor.parameters)


def config_yaml(cfg: Config) -> str:
    return redact(OmegaConf.to_yaml(OmegaConf.structured(dataclasses.asdict(cfg))))


def record_submission(cfg: Config, job: submitit.Job, task: str, extra: dict[str, Any]) -> Path:
    """Write ``config.yaml`` and ``job.json`` beside submitit's script and logs in ``jobs/<job_id>/``."""
    folder = paths.job_dir(cfg, job.job_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config_yaml(cfg))
    fields = {
        "job_id": job.job_id,
        "task": task,
        "cluster": cfg.cluster.name,
        "run_dir": str(paths.run_dir(cfg)),
        "submitted": ledger.now(),
        "world_size": cfg.cluster.world_size,
        **extra,
    }
    ledger.update(folder, {"state": "SUBMITTED"}, keep_existing=True)
    ledger.update(folder, fields)
    from sdcluster.logs import index_job

    index_job(job.job_id, folder)
    return folder


def submit(cfg: Config, task: str, job_fn: Any, dependency: str | None = None, **extra: Any) -> submitit.Job:
    executor = make_executor(cfg, f"sdcluster-{task}", dependency)
    job = executor.submit(job_fn)
    record_submission(cfg, job, task, extra)
    return job


def submit_array(
    cfgs: list[Config], task: str, job_fns: list[Any], dependency: str | None = None, **extra: Any
) -> list[submitit.Job]:
    """One SLURM job array (``<id>_0``, ``<id>_1``...), one record folder per array task with its own config.

    The array's resources come from the first config: callers only group points whose ``cluster`` agrees.
    """
    executor = make_executor(cfgs[0], f"sdcluster-{task}", dependency)
    with executor.batch():
        jobs = [executor.submit(fn) for fn in job_fns]
    for index, (cfg, job) in enumerate(zip(cfgs, jobs, strict=True)):
        record_submission(cfg, job, task, {"array_index": index, **extra})
    return jobs
