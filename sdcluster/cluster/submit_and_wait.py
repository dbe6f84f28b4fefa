"""What ``python -m sdcluster.launch`` does with one validated config: check, submit, wait, tell the user.

``train_generate`` is two jobs: under a scheduler the generation job waits (``afterok``) on training; a
foreground backend (local) runs them one after the other. Under a scheduler nothing waits unless
``launch.wait=true``: the login node is free at once.
A sweep takes the same path with N configs (:mod:`sdcluster.sweep.points`).
"""

from __future__ import annotations

import re

import submitit

from sdcluster import paths
from sdcluster.cluster import backends, records
from sdcluster.cluster.dry_run import Say, describe_outputs, dry_run
from sdcluster.cluster.interrupts import sigint_interrupts, stop_local
from sdcluster.cluster.preflight import preflight
from sdcluster.cluster.submit import submit_configs
from sdcluster.config import Config

__all__ = ["describe_outputs", "dry_run", "launch"]  # the dry run's two are re-exported for callers


def _reason(error: str) -> str:
    """The exception line of submitit's error text (it ends with a list of log files), else its last line."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    found = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Stopped|Interrupt): ", line)]
    return (found or lines or ["(no message)"])[-1]


def wait_for(cfg: Config, job: submitit.Job, kind: str, say: Say) -> bool:
    """Wait for the job; under a scheduler, stream its rank-0 log meanwhile. True when it completed.

    Ctrl-C stops the waiting under a scheduler (the job goes on) and stops a foreground job at a step with a
    checkpoint.
    """
    backend = backends.of(cfg)
    try:
        with sigint_interrupts():
            try:
                if not backend.foreground:  # a foreground job's lines reach this terminal themselves
                    folder = paths.job_dir(cfg, job.job_id)
                    log = paths.job_log(folder, job.job_id, 0)
                    records.follow(log, job.job_id, folder, backend.job_state)
                job.results()  # every task's result: result() refuses jobs with several tasks
            except KeyboardInterrupt:
                if not backend.foreground:  # the scheduler runs it: stop waiting, not the job
                    stop = backend.stop_hint(job.job_id)
                    say(f"stopped waiting; {kind} job {job.job_id} goes on ({stop} stops it)")
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
    cfg, unchecked = preflight(cfg, dry_run=cfg.launch.dry_run)  # cfg: pinned to the staged commits
    if cfg.launch.dry_run:
        return dry_run([cfg], say, unchecked)
    for note in unchecked:  # the scheduler answered but could not say everything: submitted all the same
        say(f"# not checked: {note}")
    foreground = backends.of(cfg).foreground
    wait = cfg.launch.wait if cfg.launch.wait is not None else foreground
    waiter = (lambda job, kind: wait_for(cfg, job, kind, say)) if wait else None
    planned = submit_configs([cfg], say, wait=waiter)
    if planned is None:
        return 1
    describe_outputs(cfg, say)
    return 0
