"""What ``python -m sdcluster.launch`` does with one validated config: check, submit, wait, tell the user.

``train_generate`` is two jobs: on SLURM the generation job waits with ``afterok`` on training; locally they
run one after the other. On SLURM nothing waits unless ``launch.wait=true``: the login node is free at once.
A sweep takes the same path with N configs (:mod:`sdcluster.sweep.points`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import submitit

from sdcluster import paths
from sdcluster.cluster import records
from sdcluster.cluster.interrupts import sigint_interrupts, stop_local
from sdcluster.cluster.preflight import preflight
from sdcluster.cluster.submit import describe_dry_run, submit_configs
from sdcluster.config import Config
from sdcluster.generate.plan_count import describe_counts
from sdcluster.redaction import config_yaml

Say = Callable[[str], None]


def describe_outputs(cfg: Config, say: Say) -> None:
    if cfg.task != "generate":
        say(f"run folder:   {paths.run_dir(cfg)}")
        run = paths.run_paths(cfg)
        if cfg.train.method == "lora":  # the adapters file, and a fused pipeline when asked for
            say(f"lora:         {run.lora}")
        if cfg.train.method != "lora" or cfg.train.lora.fuse_export:
            say(f"model:        {run.model}")
    if cfg.task != "train":
        say(f"images:       {paths.generation_dir(cfg)}")
        for line in describe_counts(cfg.generate):  # per template, per shard, in total: counted, not listed
            say(line)


def dry_run(cfgs: list[Config], say: Say, unchecked: list[str]) -> int:
    """Print the resolved config(s) and exactly what would be submitted; submit nothing."""
    say("# resolved config (nothing submitted: launch.dry_run=true)")
    say(config_yaml(cfgs[0]))
    describe_dry_run(cfgs, say)
    for note in unchecked:
        say(f"# not checked: {note}")
    if len(cfgs) == 1:
        describe_outputs(cfgs[0], say)
    return 0


def _reason(error: str) -> str:
    """The exception line of submitit's error text (it ends with a list of log files), else its last line."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    found = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Stopped|Interrupt): ", line)]
    return (found or lines or ["(no message)"])[-1]


def wait_for(cfg: Config, job: submitit.Job, kind: str, say: Say) -> bool:
    """Wait for the job; on SLURM, stream its rank-0 log meanwhile. True when it completed.

    Ctrl-C stops the waiting on SLURM (the job goes on) and stops a local job at a step with a checkpoint.
    """
    try:
        with sigint_interrupts():
            try:
                if cfg.cluster.name == "slurm":
                    folder = paths.job_dir(cfg, job.job_id)
                    records.follow(paths.job_log(folder, job.job_id, 0), job.job_id, folder)
                job.results()  # every task's result: result() refuses jobs with several tasks
            except KeyboardInterrupt:
                if cfg.cluster.name != "local":  # the scheduler runs it: stop waiting, not the job
                    say(f"stopped waiting; {kind} job {job.job_id} goes on (scancel {job.job_id} stops it)")
                    say(f"  follow it: python -m sdcluster.logs {job.job_id} --follow")
                    return False
                stop_local(job, say)
                job.results()
    except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as err:
        record = records.read(paths.job_dir(cfg, job.job_id))
        word = "CANCELLED" if record.get("state") == "CANCELLED" else "FAILED"
        say(f"{kind} job {job.job_id} {word}: {_reason(str(err))}")
        say(f"  its log: python -m sdcluster.logs {job.job_id}   (folder {job.paths.folder})")
        return False
    say(f"{kind} job {job.job_id} COMPLETED")
    return True


def launch(cfg: Config, say: Say = print) -> int:
    """Validate, submit, report. Returns the process exit code."""
    unchecked = preflight(cfg, dry_run=cfg.launch.dry_run)
    if cfg.launch.dry_run:
        return dry_run([cfg], say, unchecked)
    local = cfg.cluster.name == "local"
    wait = cfg.launch.wait if cfg.launch.wait is not None else local
    waiter = (lambda job, kind: wait_for(cfg, job, kind, say)) if wait else None
    planned = submit_configs([cfg], say, wait=waiter)
    if planned is None:
        return 1
    describe_outputs(cfg, say)
    return 0
