"""Observers of a job's boundaries: after each optimizer step of training, after each batch of generation.

The one seam through which something outside the loops watches or steers them: an observer is called with
the unit (``"step"`` or ``"batch"``), its count (the step just finished, the 1-based batch just written) and
the job's preemption flag, at the point where the loop is about to ask that flag whether to stop. Raising the
flag there (``flag.forced = True``, training only) stops the run exactly the way a scheduler's signal does:
collective save, then ``interrupted=True``.

Production code never registers an observer, so a boundary costs one test of an empty list. Two users:

- tests and benchmarks stop a run at a chosen step (:func:`stop_at`), or time the steps between boundaries;
- ``SDCLUSTER_TEST_PAUSE`` (:func:`requested_pause`): the job callables register it at job start when the
  variable is set, so that a SLURM test can hold a job at a known step or batch until its signal lands.
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
# A test signals within seconds of the pause line; a test that died before signalling must not hold the
# (shared, one-node) test cluster past the waits of the tests after it (5 minutes each), so the pause ends.
TEST_PAUSE_LIMIT_S = 120.0


def requested_pause(limit_s: float = TEST_PAUSE_LIMIT_S) -> contextlib.AbstractContextManager[None]:
    """The pause ``SDCLUSTER_TEST_PAUSE`` asks for, observed inside the block; a no-op when it is unset.

    With ``SDCLUSTER_TEST_PAUSE=step:3`` (or ``batch:1``; ``step:3@1`` for array task 1 only) the first
    attempt of a job logs ``paused at step 3`` there and waits until its flag is raised (at most ``limit_s``,
    then it goes on as if never paused). The test waits for that line, then signals. The variable is for
    tests; nothing else sets it.
    """
    wanted = os.environ.get(TEST_PAUSE)
    env = backends.environment()
    if not wanted or env.restart_count:
        return contextlib.nullcontext()
    target, _, task = wanted.partition("@")
    if task and env.array_task != task:
        return contextlib.nullcontext()

    def hold(unit: str, count: int, flag: Flag) -> None:
        if f"{unit}:{count}" != target:
            return
        log.info("paused at %s %d until a signal arrives (%s)", unit, count, TEST_PAUSE)
        deadline = time.monotonic() + limit_s
        while not flag.raised and time.monotonic() < deadline:
            time.sleep(0.05)

    return observing(hold)
