"""``python -m sdcluster.sweep report``: one row per point, a CSV beside it, and the loss curves as a PNG.

Numbers come from each run's own ``metrics.jsonl`` (what its log printed) and each job's ``job.json``, so
the report can be made while jobs are still running and always agrees with the runs' logs.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sdcluster.cluster import records
from sdcluster.paths import RunPaths
from sdcluster.progress import format_duration
from sdcluster.status import table
from sdcluster.sweep.ledger import job_state, load
from sdcluster.train import metrics

REPORT_CSV = "report.csv"
REPORT_PNG = "report.png"


@dataclass
class Row:
    point: int
    values: str
    job_id: str
    state: str
    steps: int
    last_loss: float | None
    best_val_loss: float | None
    last_val_loss: float | None
    wall: str


def _seconds(stamp: str | None) -> float | None:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp() if stamp else None


def wall_time(job: dict[str, Any]) -> str:
    """From the first attempt's start to the last attempt's end (or now, while it runs)."""
    attempts = job.get("attempts") or []
    start = _seconds(attempts[0].get("started")) if attempts else None
    if start is None:
        return "-"
    end = _seconds(attempts[-1].get("ended")) or time.time()
    return format_duration(end - start)


def rows(record: dict[str, Any]) -> list[Row]:
    out = []
    for point in record["points"]:
        job_id = point["jobs"][0]
        jobs_root = Path(point["config"]["jobs_root"])
        folder = records.find_job(job_id, jobs_root)
        job = records.read(folder) if folder else {}
        train, val = metrics.read(RunPaths(Path(point["run_dir"])).metrics)
        out.append(
            Row(
                point=point["index"],
                values=" ".join(f"{k}={v}" for k, v in point["values"].items()),
                job_id=job_id,
                state=job_state(job_id, jobs_root),
                steps=train[-1][0] if train else 0,
                last_loss=train[-1][1] if train else None,
                best_val_loss=min(v for _, v in val) if val else None,
                last_val_loss=val[-1][1] if val else None,
                wall=wall_time(job),
            )
        )
    return out


def best(table: list[Row]) -> Row | None:
    """Lowest best validation loss; without validation, the lowest last training loss."""
    scored = [r for r in table if r.best_val_loss is not None] or [
        r for r in table if r.last_loss is not None
    ]
    key = "best_val_loss" if scored and scored[0].best_val_loss is not None else "last_loss"
    return min(scored, key=lambda r: getattr(r, key)) if scored else None


def format_table(table: list[Row]) -> str:
    def fmt(value: object) -> str:
        return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))

    header = list(asdict(table[0]).keys()) if table else []
    cells = [header] + [[fmt(v) for v in asdict(r).values()] for r in table]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


def figure(record: dict[str, Any]) -> Any:
    """Training (solid) and validation (dashed) loss per point, each measured point marked."""
    import matplotlib

    matplotlib.use("Agg")  # a login node has no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for point in record["points"]:
        train, val = metrics.read(RunPaths(Path(point["run_dir"])).metrics)
        label = " ".join(f"{k}={v}" for k, v in point["values"].items()) or f"point {point['index']}"
        if train:  # markers: a point that logged one loss so far is a dot, not an invisible line
            (line,) = ax.plot(*zip(*train, strict=True), marker="o", markersize=3, label=f"{label} train")
            if val:
                style = {"marker": "s", "markersize": 3, "color": line.get_color()}
                ax.plot(*zip(*val, strict=True), "--", label=f"{label} val", **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"sweep {record['sweep_id']}")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot(record: dict[str, Any], dest: Path) -> Path:
    """:func:`figure` saved atomically as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(record)
    tmp = dest.with_name(f".{dest.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(dest)
    return dest


def report(folder: Path, say: Any = print) -> int:
    record = load(folder)
    table = rows(record)
    say(f"sweep {record['sweep_id']} ({record['task']} on {record['cluster']})")
    say(format_table(table))
    with (folder / REPORT_CSV).open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(asdict(table[0]).keys()))
        writer.writeheader()
        writer.writerows(asdict(r) for r in table)
    winner = best(table)
    if winner:
        say(f"best: point {winner.point} ({winner.values}), job {winner.job_id}")
    png = plot(record, folder / REPORT_PNG)
    say(f"csv: {folder / REPORT_CSV}")
    say(f"plot: {png}")
    return 0


def summary(folder: Path) -> list[str]:
    """One line of ``sweep list``: id, task, points, their states counted, best validation loss, folder."""
    record = load(folder)
    points = rows(record)
    counts: dict[str, int] = {}
    for point in points:
        counts[point.state] = counts.get(point.state, 0) + 1
    winner = best(points)
    if winner is None:
        scored = "-"
    elif winner.best_val_loss is not None:
        scored = f"{winner.best_val_loss:.4f} (point {winner.point}: {winner.values})"
    else:  # no validation ran: the training loss is all there is, and said to be so
        scored = f"no val; last loss {winner.last_loss:.4f} (point {winner.point})"
    states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    created = str(record.get("created", "?")).replace("T", " ")[:16]
    return [record["sweep_id"], record["task"], created, str(len(points)), states, scored, str(folder)]


def list_sweeps(folders: list[Path]) -> list[str]:
    """The ``sweep list`` table, or what to do when there is no sweep yet."""
    if not folders:
        return [
            "no sweeps yet: run `sdcluster launch -m +cluster=slurm optim.lr=1e-5,5e-6` (one point per "
            "value, one job array); `sdcluster sweep list` then shows it"
        ]
    header = ["sweep", "task", "created", "points", "states", "best val_loss", "folder"]
    return table([header, *(summary(folder) for folder in folders)])
