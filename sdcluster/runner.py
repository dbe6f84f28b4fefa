"""From a validated config to submitted jobs, and what the user is told afterwards.

``train_generate`` is two jobs: on SLURM the generation job waits with ``afterok`` on training; locally they
run one after the other. On SLURM nothing waits unless ``launch.wait=true``: the login node is free at once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import submitit

from sdcluster import paths, submit
from sdcluster.config import Config
from sdcluster.jobs import GenerateJob, TrainJob
from sdcluster.preflight import preflight

Say = Callable[[str], None]


def _jobs_of(cfg: Config) -> list[tuple[str, object]]:
    jobs: list[tuple[str, object]] = []
    if cfg.task in ("train", "train_generate"):
        jobs.append(("train", TrainJob(cfg)))
    if cfg.task in ("generate", "train_generate"):
        jobs.append(("generate", GenerateJob(cfg)))
    return jobs


def _describe(cfg: Config, say: Say) -> None:
    if cfg.task != "generate":
        say(f"run folder:   {paths.run_dir(cfg)}")
        say(f"model:        {paths.run_paths(cfg).model}")
    if cfg.task != "train":
        say(f"images:       {paths.generation_dir(cfg)}")


def dry_run(cfg: Config, say: Say) -> int:
    say("# resolved config (nothing submitted: launch.dry_run=true)")
    say(submit.config_yaml(cfg))
    for task, _ in _jobs_of(cfg):
        say(f"# sbatch script of the {task} job")
        say(submit.sbatch_preview(cfg, f"sdcluster-{task}"))
    _describe(cfg, say)
    return 0


def _wait(cfg: Config, job: submitit.Job, task: str, say: Say) -> bool:
    """Wait for the job; on SLURM, stream its rank-0 log meanwhile (``launch.wait=true``)."""
    if cfg.cluster.name == "slurm":
        from sdcluster.logs import follow, log_file

        folder = paths.job_dir(cfg, job.job_id)
        follow(log_file(folder, job.job_id, 0, err=False), job.job_id, folder)
    try:
        job.result()
    except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as err:
        say(f"{task} job {job.job_id} FAILED: {str(err).strip().splitlines()[-1]}")
        say(f"  its log: python -m sdcluster.logs {job.job_id}   (folder {job.paths.folder})")
        return False
    say(f"{task} job {job.job_id} COMPLETED")
    return True


def _submit_generation(cfg: Config, dependency: str | None) -> list[submitit.Job]:
    if cfg.cluster.name == "slurm" and cfg.generate.shards > 1:
        shards = cfg.generate.shards
        return submit.submit_array([cfg] * shards, "generate", [GenerateJob(cfg)] * shards, dependency)
    return [submit.submit(cfg, "generate", GenerateJob(cfg), dependency=dependency)]


def launch(cfg: Config, say: Say = print) -> int:
    """Validate, submit, report. Returns the process exit code."""
    preflight(cfg)
    if cfg.launch.dry_run:
        return dry_run(cfg, say)
    wait = cfg.launch.wait if cfg.launch.wait is not None else cfg.cluster.name == "local"
    submitted: list[tuple[str, submitit.Job]] = []
    dependency = None
    for task, fn in _jobs_of(cfg):
        jobs = _submit_generation(cfg, dependency) if task == "generate" else [submit.submit(cfg, task, fn)]
        for job in jobs:
            submitted.append((task, job))
            say(f"submitted {task} job {job.job_id}: jobs folder {paths.job_dir(cfg, job.job_id)}")
            say(f"  follow it: python -m sdcluster.logs {job.job_id} --follow")
        if wait and not all(_wait(cfg, job, task, say) for job in jobs):
            return 1
        if task == "train" and cfg.cluster.name == "slurm":
            dependency = f"afterok:{jobs[0].job_id}"
    _describe(cfg, say)
    return 0


if __name__ == "__main__":
    sys.exit("use: python -m sdcluster.launch [overrides]")
