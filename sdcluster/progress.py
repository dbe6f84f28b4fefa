"""Progress lines that read well in a SLURM log file: one plain line per report, no carriage returns.

tqdm-style bars become one endless physical line in a log file; here each report is a full line with the
count, the rate, the ETA and whatever metrics the caller passes (``step 20/40 | loss 0.1234 | ...``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("sdcluster")


def format_duration(seconds: float) -> str:
    """``1h02m03s`` / ``2m03s`` / ``3s``: short, sortable by eye, no locale."""
    if seconds != seconds or seconds == float("inf"):  # NaN or inf: nothing measured yet
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}"
    return str(value)


class ProgressLog:
    """Rate and ETA from the work done since this object was made (a resumed job starts at ``start``)."""

    def __init__(
        self,
        total: int,
        unit: str = "step",
        start: int = 0,
        emit: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.unit = unit
        self.start = start
        self.emit = emit or log.info
        self.clock = clock
        self.t0 = clock()

    def rate(self, done: int) -> float:
        elapsed = self.clock() - self.t0
        return (done - self.start) / elapsed if elapsed > 0 and done > self.start else float("nan")

    def line(self, done: int, **metrics: object) -> str:
        rate = self.rate(done)
        eta = (self.total - done) / rate if rate == rate and rate > 0 else float("nan")
        parts = [f"{self.unit} {done}/{self.total}"]
        parts += [f"{key} {_format_value(value)}" for key, value in metrics.items()]
        rate_text = f"{rate:.2f}" if rate == rate else "?"
        parts += [f"{rate_text} {self.unit}s/s" if self.unit != "step" else f"{rate_text} it/s"]
        parts += [f"eta {format_duration(eta)}"]
        return " | ".join(parts)

    def report(self, done: int, **metrics: object) -> str:
        text = self.line(done, **metrics)
        self.emit(text)
        return text
