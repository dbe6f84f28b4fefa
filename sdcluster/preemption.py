"""Preemption and time limits: a flag in the signal handler, a collective save at the next step.

submitit's own USR2 handler checkpoints on global rank 0 only, *inside* the handler, and classifies any
signal after min(0.8 x limit, limit - 10 min) as a time-out (so with a limit of 10 minutes or less every
signal is a "time-out"). We replace it on every rank by a handler that only records the signal; the training
loop then agrees across ranks at a step boundary, every rank saves, and rank 0 hands over to submitit's
handler purely for the requeue (``scontrol requeue`` + pickled resubmission), after our own accounting
(:mod:`sdcluster.ledger`) decided whether the budget (``cluster.max_requeues`` / ``max_timeouts``) allows it.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("sdcluster")

PREEMPT_SIGNAL = signal.SIGUSR2


class PreemptionFlag:
    """Records the scheduler's warning signal; does no I/O and takes no lock in the handler."""

    def __init__(self) -> None:
        self.signal_time: float | None = None
        self._submitit_handler: Any = None
        self.forced = False

    def install(self) -> None:
        self._submitit_handler = signal.getsignal(PREEMPT_SIGNAL)
        signal.signal(PREEMPT_SIGNAL, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
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
        """Let submitit dump the resubmission and run ``scontrol requeue``; it then exits the process."""
        handler = self._submitit_handler
        if not callable(handler):
            raise RuntimeError("not running under submitit: rerun the same command to resume")
        handler(PREEMPT_SIGNAL, None)


def classify(elapsed_s: float, timeout_min: int, signal_delay_s: int, slack_s: float = 90.0) -> str:
    """``timeout`` when the signal came about when the time-limit warning is due, else ``preempted``.

    SLURM sends the warning ``signal_delay_s`` before the limit; a signal well before that is preemption.
    """
    due = timeout_min * 60 - signal_delay_s
    return "timeout" if elapsed_s >= due - slack_s else "preempted"


StopCheck = Callable[[], bool]
