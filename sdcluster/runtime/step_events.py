"""Observers of a job's boundaries: after each optimizer step of training, after each batch of generation.

The one seam through which something outside the loops watches or steers them: an observer is called with
the unit (``"step"`` or ``"batch"``), its count (the step just finished, the 1-based batch just written) and
the job's preemption flag, at the point where the loop is about to ask that flag whether to stop. Raising the
flag there (``flag.forced = True``, training only) stops the run exactly the way a scheduler's signal does:
collective save, then ``interrupted=True``.

Production code registers one observer, and only in a job with a time limit: the job's own clock
(:class:`~.requeue.JobClock`, through :func:`observe`), which times each step or batch and raises the flag
when the next one and a save would not fit. Without it a boundary costs one test of an empty list. Else
only tests and benchmarks observe:

- they stop a run at a chosen step (:func:`stop_at`), or time the steps between boundaries;
- ``SDCLUSTER_TEST_PAUSE``, ``SDCLUSTER_TEST_SLOW`` and ``SDCLUSTER_TEST_FAIL`` (:func:`requested_pause`):
  the job callables register them at job start when the variables are set, so that a SLURM test can hold a
  job at a known step or batch until its signal lands, slow every step so that a time limit falls mid-run,
  or fail at a known step on every attempt.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from sdcluster.cluster import backends

log = logging.getLogger("sdcluster")


class Flag(Protocol):
    """What an observer may read of the job's preemption flag (:class:`~.requeue.PreemptionFlag`)."""

    @property
    def raised(self) -> bool: ...


Observer = Callable[[str, int, Flag], None]

_observers: list[Observer] = []


class Polled:
    """A flag read through a function: the generation job knows its stop only as ``should_stop()``."""

    def __init__(self, raised: Callable[[], bool]) -> None:
        self._raised = raised

    @property
    def raised(self) -> bool:
        return self._raised()


def boundary(unit: str, count: int, flag: Flag) -> None:
    """Tell every observer that ``unit`` number ``count`` is done; the loop reads ``flag`` right after."""
    for observer in _observers:
        observer(unit, count, flag)


def observe(observer: Observer) -> None:
    """Call ``observer`` at every boundary for the rest of the process (the job's own clock: one per job)."""
    _observers.append(observer)


@contextlib.contextmanager
def observing(*observers: Observer) -> Iterator[None]:
    """Call ``observers`` at every boundary inside the block (in this order, after those already there)."""
    _observers.extend(observers)
    try:
        yield
    finally:
        for observer in observers:
            _observers.remove(observer)


def stop_at(when: Callable[[int], bool]) -> contextlib.AbstractContextManager[None]:
    """Inside the block, training stops at the first step ``when(step)`` accepts, as a preemption would.

    For tests and benchmarks: ``with stop_at(lambda step: step == 2): train(cfg)`` saves at step 2 and
    returns ``interrupted=True``. Every rank must see the same answer, as every rank sees the same signal.
    """

    def force(unit: str, count: int, flag: Flag) -> None:
        if unit == "step" and when(count):
            flag.forced = True  # type: ignore[attr-defined] # training's flag is a PreemptionFlag

    return observing(force)


TEST_PAUSE = "SDCLUSTER_TEST_PAUSE"
TEST_SLOW = "SDCLUSTER_TEST_SLOW"
TEST_FAIL = "SDCLUSTER_TEST_FAIL"
# A test signals within seconds of the pause line; a test that died before signalling must not hold the
# (shared, one-node) test cluster past the waits of the tests after it (5 minutes each), so the pause ends.
TEST_PAUSE_LIMIT_S = 120.0


def requested_pause(limit_s: float = TEST_PAUSE_LIMIT_S) -> contextlib.AbstractContextManager[None]:
    """The pause ``SDCLUSTER_TEST_PAUSE`` and the slowness ``SDCLUSTER_TEST_SLOW`` ask for, observed inside
    the block; a no-op when both are unset, and in any attempt but the first.

    With ``SDCLUSTER_TEST_PAUSE=step:3`` (or ``batch:1``; ``step:3@1`` for array task 1 only) the first
    attempt of a job logs ``paused at step 3`` there and waits until its flag is raised (at most ``limit_s``,
    then it goes on as if never paused). The test waits for that line, then signals. With
    ``SDCLUSTER_TEST_SLOW=step:2.5`` (or ``batch:2.5``) every step (batch) of the first attempt takes 2.5 s
    longer: a short time limit then falls mid-run, and the requeued attempt runs at full speed. With
    ``SDCLUSTER_TEST_FAIL=step:3@1`` global rank 1 (``step:3``: rank 0) raises at step 3 in *every*
    attempt, as a bug or bad data would (the failure budget's tests). The variables are for tests; nothing
    else sets them.
    """
    env = backends.environment()
    fail = _fail(os.environ.get(TEST_FAIL), env.rank)
    first = not env.restart_count
    pause = _pause(os.environ.get(TEST_PAUSE), env.array_task, limit_s) if first else None
    slow = _slow(os.environ.get(TEST_SLOW)) if first else None
    observers = [o for o in (fail, pause, slow) if o is not None]
    return observing(*observers) if observers else contextlib.nullcontext()


def _slow(wanted: str | None) -> Observer | None:
    """The observer that sleeps at every boundary of ``SDCLUSTER_TEST_SLOW``'s unit, or None."""
    if not wanted:
        return None
    slow_unit, _, seconds = wanted.partition(":")

    def sleep(unit: str, count: int, flag: Flag) -> None:
        if unit == slow_unit:
            time.sleep(float(seconds))

    return sleep


def _fail(wanted: str | None, rank: int) -> Observer | None:
    """The observer that raises at ``SDCLUSTER_TEST_FAIL``'s boundary on its rank, or None."""
    target, _, on_rank = (wanted or "").partition("@")
    if not target or int(on_rank or 0) != rank:
        return None

    def fail(unit: str, count: int, flag: Flag) -> None:
        if f"{unit}:{count}" == target:
            raise RuntimeError(f"failing at {unit} {count} on rank {rank} ({TEST_FAIL})")

    return fail


def _pause(wanted: str | None, array_task: str | None, limit_s: float) -> Observer | None:
    """The observer that holds the job at ``SDCLUSTER_TEST_PAUSE``'s boundary, or None."""
    if not wanted:
        return None
    target, _, task = wanted.partition("@")
    if task and array_task != task:
        return None

    def hold(unit: str, count: int, flag: Flag) -> None:
        if f"{unit}:{count}" != target:
            return
        log.info("paused at %s %d until a signal arrives (%s)", unit, count, TEST_PAUSE)
        deadline = time.monotonic() + limit_s
        while not flag.raised and time.monotonic() < deadline:
            time.sleep(0.05)

    return hold
