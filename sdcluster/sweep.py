"""Sweeps: Hydra multirun points submitted as one SLURM job array, and a ledger to resubmit and report.

``python -m sdcluster.launch -m +cluster=slurm optim.lr=1e-5,5e-6`` composes and validates every point on
the login node first (nothing is queued if any point is wrong), then submits them together and returns:
unlike the Hydra submitit launcher it never waits on the jobs. ``outputs/sweeps/<id>/sweep.json`` records
each point's overrides, config, run folder and job ids, so that

    python -m sdcluster.sweep resubmit <sweep folder or job id> --failed   # only the points that failed
    python -m sdcluster.sweep report <sweep folder or job id>              # table + CSV + loss plot

Each point resumes from its own checkpoints because its run folder is named by its config.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sdcluster import ledger, paths, submit
from sdcluster.config import Config, ConfigError
from sdcluster.jobs import GenerateJob, TrainJob
from sdcluster.preflight import preflight
from sdcluster.sweep_ledger import FAILED, find, job_state, load, point_config, write

Say = Callable[[str], None]


@dataclasses.dataclass
class Point:
    """One sweep point as collected from Hydra: its resolved config and the overrides that made it."""

    cfg: Config
    overrides: list[str]


def _swept_values(points: list[Point]) -> list[dict[str, str]]:
    """Per point, the overrides whose value differs between points (what the sweep varies)."""
    parsed = [dict(o.split("=", 1) for o in p.overrides if "=" in o) for p in points]
    keys = sorted({k for d in parsed for k in d if len({e.get(k) for e in parsed}) > 1})
    return [{k.lstrip("+"): d.get(k, "") for k in keys} for d in parsed]


def _submit_points(cfgs: list[Config], task: str, sweep_dir: Path) -> list[list[str]]:
    """Train points as one array (when their cluster settings agree), each generation after its training."""
    ids: list[list[str]] = [[] for _ in cfgs]
    if task in ("train", "train_generate"):
        same = all(c.cluster == cfgs[0].cluster for c in cfgs)
        fns = [TrainJob(c) for c in cfgs]
        if same:
            jobs = submit.submit_array(cfgs, "train", fns, sweep=str(sweep_dir))
        else:
            jobs = [
                submit.submit(c, "train", f, sweep=str(sweep_dir)) for c, f in zip(cfgs, fns, strict=True)
            ]
        for i, job in enumerate(jobs):
            ids[i].append(job.job_id)
    if task in ("generate", "train_generate"):
        for i, c in enumerate(cfgs):
            dependency = f"afterok:{ids[i][0]}" if ids[i] else None
            ids[i].append(
                submit.submit(c, "generate", GenerateJob(c), dependency, sweep=str(sweep_dir)).job_id
            )
    return ids


def check_distinct_outputs(points: list[Point]) -> None:
    """Refuse points that would write one folder at once: a run folder is named by the settings that change
    what is learned, so points that differ only in others (``train.log_every``, ``data.num_workers``, ...)
    would train the same run concurrently; generation points likewise share an image folder."""
    seen: dict[Path, int] = {}
    for i, point in enumerate(points):
        training = point.cfg.task in ("train", "train_generate")
        folder = paths.run_dir(point.cfg) if training else paths.generation_dir(point.cfg)
        if folder in seen:
            j, values = seen[folder], _swept_values(points)
            what, changes = ("train", "what is learned") if training else ("generate into", "the images")
            raise ConfigError(
                f"sweep points {j} {values[j]} and {i} {values[i]} would {what} the same folder at once "
                f"({folder}): they differ only in settings that do not change {changes}. Fix: sweep a key "
                "that does, or run the values one after another"
            )
        seen[folder] = i


def submit_sweep(points: list[Point], say: Say = print) -> int:
    """Validate every point, then submit them all; write the ledger; return at once."""
    cfgs = [p.cfg for p in points]
    for i, cfg in enumerate(cfgs):
        if cfg.generate.shards > 1 and cfg.task != "train":
            raise ConfigError(f"point {i}: generate.shards>1 is not supported inside a sweep. Fix: shards=1")
        preflight(cfg)
    check_distinct_outputs(points)  # after each point's own checks, which name the more specific problem
    task = cfgs[0].task
    sweep_id = time.strftime("%Y%m%d-%H%M%S") + "-" + paths.stable_hash([p.overrides for p in points], 6)
    sweep_dir = Path(cfgs[0].output_root) / "sweeps" / sweep_id
    sweep_dir.mkdir(parents=True)
    ids = _submit_points(cfgs, task, sweep_dir)
    values = _swept_values(points)
    record = {
        "sweep_id": sweep_id,
        "created": ledger.now(),
        "task": task,
        "cluster": cfgs[0].cluster.name,
        "swept": sorted(values[0]) if values else [],
        "points": [
            {
                "index": i,
                "overrides": p.overrides,
                "values": values[i],
                "run_dir": str(paths.run_dir(p.cfg)),
                "jobs": ids[i],
                "config": dataclasses.asdict(p.cfg),
            }
            for i, p in enumerate(points)
        ],
    }
    write(sweep_dir, record)
    say(f"sweep {sweep_id}: {len(points)} points submitted -> {sweep_dir}")
    tasks = {"train": ["train"], "generate": ["generate"], "train_generate": ["train", "generate"]}[task]
    for point, cfg in zip(record["points"], cfgs, strict=True):
        say(f"point {point['index']} {point['values']}:")
        for name, job_id in zip(tasks, point["jobs"], strict=True):
            say(f"submitted {name} job {job_id}: jobs folder {paths.job_dir(cfg, job_id)}")
    say(f"report: python -m sdcluster.sweep report {sweep_dir}")
    return 0


def resubmit_failed(folder: Path, say: Say = print) -> int:
    """Resubmit only the points whose latest job failed; each resumes from its own checkpoints."""
    record = load(folder)
    failed = []
    for point in record["points"]:
        cfg = point_config(point)
        if job_state(point["jobs"][-1], Path(cfg.jobs_root)) in FAILED:
            failed.append((point, cfg))
    if not failed:
        say(f"sweep {record['sweep_id']}: no failed points")
        return 0
    for _, cfg in failed:
        preflight(cfg)
    ids = _submit_points([cfg for _, cfg in failed], record["task"], folder)
    for (point, _), new in zip(failed, ids, strict=True):
        point.setdefault("history", []).append(point["jobs"])
        point["jobs"] = new
        say(f"  point {point['index']} {point['values']}: resubmitted as {' '.join(new)}")
    write(folder, record)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdcluster.sweep", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="table, CSV and loss plot of a sweep (works while running)")
    report.add_argument("sweep", help="sweep folder, sweep id, or a job id of one of its points")
    again = commands.add_parser("resubmit", help="resubmit points of a sweep")
    again.add_argument("sweep")
    again.add_argument("--failed", action="store_true", required=True, help="only the failed points")
    args = parser.parse_args(argv)
    try:
        folder = find(args.sweep)
        if args.command == "resubmit":
            return resubmit_failed(folder)
        from sdcluster.sweep_report import report as make_report

        return make_report(folder)
    except ConfigError as err:
        print(f"sdcluster.sweep: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
