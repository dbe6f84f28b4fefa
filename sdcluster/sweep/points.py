"""Sweep points: validate every point, submit them all through the one submission path, keep a ledger.

Hydra's launcher plugin (``hydra_plugins/sdcluster_launcher``) hands over every composed point of
``python -m sdcluster.launch -m +cluster=slurm optim.lr=1e-5,5e-6``: nothing is queued if any point is wrong;
then the points go to :func:`sdcluster.cluster.submit.submit_configs` (training as one job array, each
point's generation, sharded or not, after its own training) and the login node returns at once, unlike the
Hydra submitit launcher, which waits on the jobs. ``outputs/sweeps/<id>/sweep.json`` records each point's
overrides, config, run folder and job ids. Each point resumes from its own checkpoints because its run
folder is named by its config.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

from sdcluster import identity, paths
from sdcluster.cluster import backends, records
from sdcluster.cluster.dry_run import dry_run
from sdcluster.cluster.preflight import checks_together, preflight
from sdcluster.cluster.submit import PlannedJob, submit_configs
from sdcluster.config import Config, ConfigError
from sdcluster.sweep.ledger import FAILED, job_state, load, point_config, write

Say = Callable[[str], None]


@dataclasses.dataclass
class Point:
    """One sweep point as composed by Hydra: its resolved config and the overrides that made it."""

    cfg: Config
    overrides: list[str]


def swept_values(points: list[Point]) -> list[dict[str, str]]:
    """Per point, the overrides whose value differs between points (what the sweep varies)."""
    parsed = [dict(o.split("=", 1) for o in p.overrides if "=" in o) for p in points]
    keys = sorted({k for d in parsed for k in d if len({e.get(k) for e in parsed}) > 1})
    return [{k.lstrip("+"): d.get(k, "") for k in keys} for d in parsed]


def check_distinct_outputs(points: list[Point]) -> None:
    """Refuse points that would write one folder at once: a run folder is named by the settings that change
    what is learned, so points that differ only in others (``train.log_every``, ``data.num_workers``, ...)
    would train the same run concurrently; generation points likewise share an image folder."""
    seen: dict[Path, int] = {}
    for i, point in enumerate(points):
        training = point.cfg.trains
        folder = paths.run_dir(point.cfg) if training else paths.generation_dir(point.cfg)
        if folder in seen:
            j, values = seen[folder], swept_values(points)
            what, changes = ("train", "what is learned") if training else ("generate into", "the images")
            raise ConfigError(
                f"sweep points {j} {values[j]} and {i} {values[i]} would {what} the same folder at once "
                f"({folder}): they differ only in settings that do not change {changes}. Fix: sweep a key "
                "that does, or run the values one after another"
            )
        seen[folder] = i


def _job_ids(planned: list[PlannedJob], count: int) -> list[list[str]]:
    """Per point, its job ids in submission order (training first, then its generation shards; the report
    reads the first as the training job). A cache array queued ahead of training is shared by the points it
    serves, and listed by none of them: their training jobs wait on it."""
    ids: list[list[str]] = [[] for _ in range(count)]
    trains = any(job.kind == "train" for job in planned)
    for job in planned:
        if job.kind == "cache" and trains:
            continue
        for point, job_id in zip(job.points, job.job_ids, strict=True):
            ids[point].append(job_id)
    return ids


def submit_sweep(points: list[Point], say: Say = print) -> int:
    """Validate every point, then submit them all; write the ledger; return at once."""
    unchecked: list[str] = []
    pinned = []
    with checks_together():  # points that read the same data: it is checked and pinned once for all of them
        for point in points:  # each as it is submitted: pinned to the staged commits, which name its run
            cfg, unchecked = preflight(point.cfg, dry_run=point.cfg.launch.dry_run)
            pinned.append(dataclasses.replace(point, cfg=cfg))
    points = pinned
    cfgs = [p.cfg for p in points]
    check_distinct_outputs(points)  # after each point's own checks, which name the more specific problem
    if cfgs[0].launch.dry_run:
        return dry_run(cfgs, say, unchecked, [str(v) for v in swept_values(points)])
    for note in unchecked:  # the scheduler answered but could not say everything: submitted all the same
        say(f"# not checked: {note}")
    sweep_id = time.strftime("%Y%m%d-%H%M%S") + "-" + identity.stable_hash([p.overrides for p in points], 6)
    sweep_dir = paths.sweep_dir(cfgs[0].output_root, sweep_id)
    sweep_dir.mkdir(parents=True)
    values = swept_values(points)
    for i, value in enumerate(values):
        say(f"point {i} {value}")
    planned = submit_configs(cfgs, say, extra={"sweep": str(sweep_dir)})
    ids = _job_ids(planned or [], len(points))
    record = {
        "sweep_id": sweep_id,
        "created": records.now(),
        "task": cfgs[0].task,
        "cluster": backends.of(cfgs[0]).name,
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
    say(f"report: python -m sdcluster.sweep report {sweep_dir}")
    return 0 if planned is not None else 1


def resubmit_failed(folder: Path, say: Say = print) -> int:
    """Resubmit only the points with a failed job; each resumes from its own checkpoints."""
    record = load(folder)
    failed = []
    for point in record["points"]:
        cfg = point_config(point)
        if any(job_state(job_id, Path(cfg.jobs_root)) in FAILED for job_id in point["jobs"]):
            failed.append((point, cfg))
    if not failed:
        say(f"sweep {record['sweep_id']}: no failed points")
        return 0
    with checks_together():
        failed = [(point, preflight(cfg)[0]) for point, cfg in failed]  # the configs as submitted
    planned = submit_configs([cfg for _, cfg in failed], say, extra={"sweep": str(folder)})
    ids = _job_ids(planned or [], len(failed))
    for (point, _), new in zip(failed, ids, strict=True):
        point.setdefault("history", []).append(point["jobs"])
        point["jobs"] = new
        say(f"  point {point['index']} {point['values']}: resubmitted as {' '.join(new)}")
    write(folder, record)
    return 0 if planned is not None else 1
