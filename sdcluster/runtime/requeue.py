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
SLURM's SIGTERM is a stop signal too, and the job saves at the next step boundary; then the backend
says whether the scheduler is preempting it (``PreemptTime`` set; a ``scancel`` sets none) and how the
site ends preempted jobs, and the job leaves well within the partition's GraceTime: under
``PreemptMode=REQUEUE`` rank 0 records PREEMPTED and requeues the job itself (within
``cluster.max_requeues``; SLURM requeues only a job it kills at the end of the grace time, so nothing is
doubled, and accounting says REQUEUED); under ``CANCEL`` it records CANCELLED and cancels the job itself
(accounting says CANCELLED); after a ``scancel`` it records CANCELLED. A cancelled job resumes by the same
command.

A time limit may also come without a warning the job hears (a site that blocks user signals, a
``signal_delay_s`` shorter than a step and a save, a signal sent to the batch shell only), so the job keeps
its own clock (:class:`JobClock`): given the scheduler's end time, it raises the flag at the boundary after
which the next step (or batch) and a save would no longer fit, and the job saves and requeues as on a
time-out, within ``cluster.max_timeouts``.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from sdcluster.cluster import backends, records

if TYPE_CHECKING:  # annotations only: the protocol reads a few cluster.* fields, never builds a config
    from sdcluster.config import Config
    from sdcluster.runtime.step_events import Flag

log = logging.getLogger("sdcluster")

PREEMPT_SIGNAL = signal.SIGUSR2  # submitit's warning signal, whatever the backend


class JobStopped(RuntimeError):
    """The job stopped early with its state saved and is not requeued; the message says how to resume."""


# Kept free beyond the next step and a save: the requeue itself (every rank exits, rank 0 asks the
# scheduler) and the play of a step slower than any seen so far.
CLOCK_MARGIN_S = 20.0


class JobClock:
    """Whether the next unit of work (a training step, a generation batch) and a save fit before ``end_time``.

    Each interval between two boundaries is one unit, the saves inside it left out (they are timed on their
    own); the next unit is expected to take as long as the longest so far (a step that validated included:
    the clock errs early, never late), the next save as long as the longest timed in this attempt, or
    :meth:`expect_save`'s guess before the first. The first interval holds the job's start-up (model load,
    resume), so it stands in for a unit only until a real one is timed.
    """

    def __init__(
        self,
        end_time: float | None,
        margin_s: float = CLOCK_MARGIN_S,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.end_time = end_time
        self.margin_s = margin_s
        self._now = now
        self._last = now()
        self._laps = 0
        self._saving_s = 0.0  # time spent saving since the last boundary
        self._save_timed = False
        self.unit_s = 0.0
        self.save_s = 0.0

    def expect_save(self, seconds: float) -> None:
        """How long a save should take, until one is timed."""
        if not self._save_timed:
            self.save_s = seconds

    def saved(self, seconds: float) -> None:
        """A save took ``seconds``."""
        self.save_s = max(self.save_s, seconds) if self._save_timed else seconds
        self._save_timed = True
        self._saving_s += seconds

    def lap(self) -> None:
        """A unit ended: time it."""
        now = self._now()
        interval = now - self._last - self._saving_s
        self._laps += 1
        self.unit_s = interval if self._laps <= 2 else max(self.unit_s, interval)
        self._last, self._saving_s = now, 0.0

    def left_s(self) -> float:
        """Seconds until the end time (infinite without one)."""
        return float("inf") if self.end_time is None else self.end_time - self._now()

    def fits(self) -> bool:
        """Whether one more unit and then a save still end before the end time, with the margin."""
        return self.left_s() > self.unit_s + self.save_s + self.margin_s


class PreemptionFlag:
    """Records the scheduler's warning signal (or a local stop); no I/O and no lock in the handler."""

    def __init__(self) -> None:
        self.signal_time: float | None = None
        self.stop_signal: str | None = None  # SIGINT/SIGTERM of a local job: a person asked it to stop
        self._submitit_handler: Any = None
        self.forced = False
        self.out_of_time = False  # the job's own clock: the next step and a save would not fit
        self.clock = JobClock(None)

    def install(self, stop_signals: tuple[signal.Signals, ...] = (), end_time: float | None = None) -> None:
        """Take over USR2 from submitit, and the backend's ``stop_signals`` (a person stopping a job); with
        the scheduler's ``end_time``, keep the job's own clock at every step or batch boundary (for the rest
        of the process, as the signal handlers)."""
        self._submitit_handler = signal.getsignal(PREEMPT_SIGNAL)
        signal.signal(PREEMPT_SIGNAL, self._on_signal)
        for signum in stop_signals:
            signal.signal(signum, self._on_stop)
        if end_time is not None:
            # imported here: at the top it would add a level to every import chain through this module
            from sdcluster.runtime import step_events

            self.clock = JobClock(end_time)
            step_events.observe(self.keep_time)

    def keep_time(self, unit: str, count: int, flag: Flag | None = None) -> None:
        """A step-events observer: time the unit that ended, and raise the flag if the next would not fit."""
        self.clock.lap()
        self.check_clock(f"after {unit} {count}", unit)

    def check_clock(self, where: str, unit: str = "step") -> None:
        """Raise the flag when the next unit and a save would no longer fit before the end time."""
        if self.out_of_time or self.clock.fits():
            return
        self.out_of_time = True
        c = self.clock
        log.warning(
            "%s: %.0f s left before the time limit, a %s takes up to %.1f s and a save %.1f s: "
            "stopping here to save and requeue",
            where,
            c.left_s(),
            unit,
            c.unit_s,
            c.save_s,
        )

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signal_time = time.time()

    def _on_stop(self, signum: int, frame: object) -> None:
        if self.stop_signal is None:  # the first one names the stop (Ctrl-C, then the launcher's SIGTERM)
            self.stop_signal = signal.Signals(signum).name
            self.signal_time = time.time()

    @property
    def raised(self) -> bool:
        return self.forced or self.signal_time is not None or self.out_of_time

    def agreed(self, accelerator: Any) -> bool:
        """True on every rank as soon as any rank got the signal or ran out of time (one tiny all-reduce
        per step); every rank then also knows whether it was the clock (rank 0 records why)."""
        self.check_clock("before the next step")  # keep_time checked at the boundary; time may have passed
        if accelerator.num_processes == 1:
            return self.raised
        import torch

        flags = [1.0 if self.raised else 0.0, 1.0 if self.out_of_time else 0.0]
        raised, out_of_time = accelerator.reduce(
            torch.tensor(flags, device=accelerator.device), reduction="sum"
        ).tolist()
        self.out_of_time = self.out_of_time or out_of_time > 0
        return raised > 0

    def requeue_through_submitit(self) -> None:
        """Let submitit dump the resubmission and requeue the job with the scheduler; it exits the process."""
        handler = self._submitit_handler
        if not callable(handler):
            raise RuntimeError("not running under submitit: rerun the same command to resume")
        handler(PREEMPT_SIGNAL, None)


def classify(elapsed_s: float, timeout_min: int, signal_delay_s: int, slack_s: float = 90.0) -> str:
    """``timeout`` when the signal came about when the time-limit warning is due, else ``preempted``.

    The scheduler sends the warning ``signal_delay_s`` before the limit; a signal well before that is
    preemption.
    """
    due = timeout_min * 60 - signal_delay_s
    return "timeout" if elapsed_s >= due - slack_s else "preempted"


def _stopped(
    backend: backends.Backend, folder: Path | None, stop_signal: str, mode: str | None, step: Any
) -> NoReturn:
    """End a job whose stop is not requeued: a person's (``scancel``, Ctrl-C; ``mode`` None) or a preemption
    the site ends (``CANCEL``), or one whose end the scheduler did not say (``mode`` "")."""
    reason = f"stopped by {stop_signal}"
    if mode == "CANCEL":
        reason = f"preempted, cancelled by the site ({reason})"
    elif mode is not None:
        reason += " while preempted"
    if folder:  # CANCELLED; should the scheduler bring the job back after all, its next attempt corrects it
        records.end_attempt(folder, "CANCELLED", step=step, exit_reason=reason, requeued=False)
    if mode == "CANCEL":  # SLURM would cancel it at the end of the grace time: do it now, and say so
        log.warning("%s at step %s: preempted, state saved; the site cancels it", stop_signal, step)
        try:
            backend.cancel()
        except RuntimeError as err:  # the scheduler still ends it at the end of the grace time
            log.warning("could not cancel the job itself (%s)", err)
    raise JobStopped(f"{reason} at step {step}; state saved. Fix: run the same command to resume")


def requeue_or_stop(
    cfg: Config, folder: Path | None, flag: PreemptionFlag, step: Any, started: float
) -> None:
    """Rank 0 after the collective save: requeue within budget, else end the job with a clear reason.

    A stop signal is a preemption when the backend says so: where the site requeues preempted jobs, the
    job requeues itself now, as on a warning signal (the scheduler requeues only a job it kills at the end
    of the grace time, so the requeue is never doubled); where it cancels them, the job ends CANCELLED.
    """
    backend = backends.of(cfg)
    if flag.stop_signal:
        mode = backend.preemption()
        if mode != "REQUEUE":
            _stopped(backend, folder, flag.stop_signal, mode, step)
        reason, state = f"preempted (stopped by {flag.stop_signal})", "PREEMPTED"
    elif flag.out_of_time:  # no warning came in time: the job's own clock said the limit was near
        reason, state = "timeout (the job's own clock)", "TIMEOUT"
    else:
        reason = classify(time.time() - started, cfg.cluster.timeout_min, cfg.cluster.signal_delay_s)
        state = "TIMEOUT" if reason == "timeout" else "PREEMPTED"
    budget = cfg.cluster.max_timeouts if state == "TIMEOUT" else cfg.cluster.max_requeues
    used = records.count_attempts(folder, state) if folder else 0
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
