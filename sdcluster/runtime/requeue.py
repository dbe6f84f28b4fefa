"""The requeue protocol: a flag in the signal handler, a collective save at the next step, requeue or stop.

submitit's own USR2 handler checkpoints on global rank 0 only, *inside* the handler, and classifies any
signal after min(0.8 x limit, limit - 10 min) as a time-out (so with a limit of 10 minutes or less every
signal is a "time-out"). We replace it on every rank by a handler that only records the signal; the training
loop then agrees across ranks at a step boundary, every rank saves, and rank 0 hands over to submitit's
handler purely for the requeue (the scheduler's requeue + pickled resubmission), after our own accounting
(:mod:`sdcluster.cluster.records`) decided whether the backend requeues at all and the budget
(``cluster.max_requeues`` / ``max_timeouts``) allows it.

A foreground backend (local) has no scheduler, but there is a person at a terminal: its ``stop_signals``
(Ctrl-C, SIGINT to the whole foreground group, or a SIGTERM) set the same flag, the job stops at the next
step boundary with a checkpoint, records the attempt as CANCELLED and says that the same command resumes.
SLURM's SIGTERM (``scancel``, or preemption at the start of the partition's GraceTime) is a stop signal
too: the job saves at the next step boundary and never requeues itself, so SLURM's own requeue of a
preempted job is not doubled and a cancelled job stays cancelled. A preempted job waits, saved, for the
scheduler to end it (:func:`wait_for_the_end`); if it comes back, its next attempt corrects the CANCELLED
record to PREEMPTED (:mod:`sdcluster.cluster.records`).
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdcluster.cluster import backends, records

if TYPE_CHECKING:  # annotations only: the protocol reads a few cluster.* fields, never builds a config
    from sdcluster.config import Config

log = logging.getLogger("sdcluster")

PREEMPT_SIGNAL = signal.SIGUSR2  # submitit's warning signal, whatever the backend


class JobStopped(RuntimeError):
    """The job stopped early with its state saved and is not requeued; the message says how to resume."""


class PreemptionFlag:
    """Records the scheduler's warning signal (or a local stop); no I/O and no lock in the handler."""

    def __init__(self) -> None:
        self.signal_time: float | None = None
        self.stop_signal: str | None = None  # SIGINT/SIGTERM of a local job: a person asked it to stop
        self._submitit_handler: Any = None
        self.forced = False

    def install(self, stop_signals: tuple[signal.Signals, ...] = ()) -> None:
        """Take over USR2 from submitit, and the backend's ``stop_signals`` (a person stopping a job)."""
        self._submitit_handler = signal.getsignal(PREEMPT_SIGNAL)
        signal.signal(PREEMPT_SIGNAL, self._on_signal)
        for signum in stop_signals:
            signal.signal(signum, self._on_stop)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signal_time = time.time()

    def _on_stop(self, signum: int, frame: object) -> None:
        if self.stop_signal is None:  # the first one names the stop (Ctrl-C, then the launcher's SIGTERM)
            self.stop_signal = signal.Signals(signum).name
            self.signal_time = time.time()

    @property
    def raised(self) -> bool:
        return self.forced or self.signal_time is not None

    def agreed(self, accelerator: Any) -> bool:
        """True on every rank as soon as any rank got the signal (one tiny all-reduce per step)."""
        if accelerator.num_processes == 1:
            return self.raised
        import torch

        flag = torch.tensor([1.0 if self.raised else 0.0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def requeue_through_submitit(self) -> None:
        """Let submitit dump the resubmission and requeue the job with the scheduler; it exits the process."""
        handler = self._submitit_handler
        if not callable(handler):
            raise RuntimeError("not running under submitit: rerun the same command to resume")
        handler(PREEMPT_SIGNAL, None)


def wait_for_the_end(poll_s: float = 1.0) -> None:
    """Idle until the scheduler kills the process: the end of a preemption's grace time.

    A preempted job that exits on its own within its grace time simply ends (FAILED or COMPLETED,
    whatever its exit code): SLURM requeues (``PreemptMode=REQUEUE``) or cancels (``CANCEL``) only the job it
    kills itself when the grace time is over. Requeueing ourselves (``scontrol requeue``) would release the
    node sooner but would bring back a job the site chose to cancel; so the saved job waits for the
    scheduler's own decision. Bounded by the scheduler: its SIGKILL (after GraceTime + KillWait) ends this.
    """
    while True:
        time.sleep(poll_s)


def classify(elapsed_s: float, timeout_min: int, signal_delay_s: int, slack_s: float = 90.0) -> str:
    """``timeout`` when the signal came about when the time-limit warning is due, else ``preempted``.

    The scheduler sends the warning ``signal_delay_s`` before the limit; a signal well before that is
    preemption.
    """
    due = timeout_min * 60 - signal_delay_s
    return "timeout" if elapsed_s >= due - slack_s else "preempted"


def requeue_or_stop(
    cfg: Config, folder: Path | None, flag: PreemptionFlag, step: Any, started: float
) -> None:
    """Rank 0 after the collective save: requeue within budget, else end the job with a clear reason."""
    if flag.stop_signal:
        backend = backends.of(cfg)
        if folder:  # CANCELLED until the job comes back: then the next attempt corrects it to PREEMPTED
            reason = f"stopped by {flag.stop_signal}"
            records.end_attempt(folder, "CANCELLED", step=step, exit_reason=reason, requeued=False)
        if backend.preempting():
            log.warning(
                "%s at step %s: preempted, state saved; waiting for the scheduler to end the job",
                flag.stop_signal,
                step,
            )
            wait_for_the_end()
        raise JobStopped(
            f"stopped by {flag.stop_signal} at step {step}; state saved. Fix: run the same command to resume"
        )
    reason = classify(time.time() - started, cfg.cluster.timeout_min, cfg.cluster.signal_delay_s)
    state = "TIMEOUT" if reason == "timeout" else "PREEMPTED"
    budget = cfg.cluster.max_timeouts if state == "TIMEOUT" else cfg.cluster.max_requeues
    used = records.count_attempts(folder, state) if folder else 0
    backend = backends.of(cfg)
    requeue = backend.requeues and used < budget
    if folder:
        records.end_attempt(folder, state, step=step, exit_reason=reason, requeued=requeue)
    if requeue:
        log.warning("%s at step %s: state saved, requeueing (%d/%d used)", reason, step, used + 1, budget)
        flag.requeue_through_submitit()  # exits the process
    hint = backend.resume_hint
    key = "cluster.max_timeouts" if state == "TIMEOUT" else "cluster.max_requeues"
    raise JobStopped(
        f"{reason} at step {step}; state saved; not requeued ({key}={budget}, used {used}): {hint}"
    )
