"""The launcher and Ctrl-C: who gets SIGINT while a job is started and while the launcher waits for it.

A local job runs in the launcher's process group, so Ctrl-C reaches both. The job must outlive the
launcher's reaction long enough to save (it installs its own handler,
:class:`~sdcluster.runtime.requeue.PreemptionFlag`), and the waiting launcher must hear Ctrl-C whatever
SIGINT disposition it inherited.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

import submitit

Say = Callable[[str], None]


@contextlib.contextmanager
def children_ignore_sigint(local: bool) -> Iterator[None]:
    """While a local job is started, SIGINT is ignored: a disposition its processes inherit.

    Ctrl-C reaches the whole foreground group; submitit's local controller would otherwise kill the job one
    second later (SIGINT, then SIGKILL) with no time to save. The job installs its own SIGINT handler, so it
    still stops, at the next step boundary, with a checkpoint; the launcher itself gets its SIGINT back as
    soon as the job is started.
    """
    with _sigint(signal.SIG_IGN) if local else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def sigint_interrupts() -> Iterator[None]:
    """While the launcher waits, Ctrl-C raises ``KeyboardInterrupt``, whatever SIGINT disposition it had.

    Python installs its handler only when SIGINT is at its default at start-up: a launcher started as a
    background job of a non-interactive shell (or by anything else that ignores SIGINT) inherits it ignored,
    and Ctrl-C would never reach the waiting. The disposition found is put back afterwards.
    """
    main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    with _sigint(signal.default_int_handler) if main else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def _sigint(handler: signal.Handlers | Callable) -> Iterator[None]:
    """SIGINT handled by ``handler`` inside the block; the disposition found is put back afterwards."""
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def stop_local(job: submitit.Job, say: Say) -> None:
    """Ask a local job to stop at its next step boundary; it saves a checkpoint first."""
    say(f"Ctrl-C: job {job.job_id} stops at its next step boundary and saves a checkpoint; waiting for it")
    process = getattr(job, "_process", None)
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)  # submitit's controller forwards SIGTERM to the job's processes
