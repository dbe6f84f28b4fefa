"""The one submission path: N validated configs -> the jobs they mean -> submitit, recorded in ``jobs/<id>/``.

``launch`` is N=1, a sweep is N points; both come here. Which jobs a config means is one table,
:data:`TASK_JOBS`: training (one job array over the points whose cluster settings agree), then per point its
generation (an array of ``generate.shards`` tasks) waiting on that point's training. With
``data.cache_shards`` > 1, training waits on the latent-cache arrays queued before it (one per entry its
points read). Each kind is sized on its own (``ClusterConfig.for_job``: a generation shard is not the
training's nodes x GPUs). How a job is submitted, and how it waits, is the backend's
(:mod:`sdcluster.cluster.backends`): a scheduler holds the dependency (and drops the generation job if its
training fails); a foreground backend has no scheduler, so there every job is waited for before the next
starts. Cluster facts come only from ``cfg.cluster``; nothing site-specific is written here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from sdcluster import atomic, paths
from sdcluster.cluster import backends, records
from sdcluster.cluster.interrupts import children_ignore_sigint, sigint_interrupts, stop_local
from sdcluster.config import Config, ConfigError
from sdcluster.config.cluster import TASK_JOBS, GenerationResources
from sdcluster.redaction import config_yaml
from sdcluster.runtime import ownership
from sdcluster.runtime.callables import CacheJob, GenerateJob, TrainJob

Say = Callable[[str], None]


@dataclass
class PlannedJob:
    """One submission: a plain job (one element) or a job array (several), each element a point's callable."""

    kind: str  # "cache", "train" or "generate"
    cfgs: list[Config]
    fns: list[Any]
    points: list[int]  # the point each element belongs to
    after: str | None = None  # the kind of the job of the same point this one waits on (afterok)
    job_ids: list[str] = field(default_factory=list)
    serves: list[int] = field(default_factory=list)  # a cache array before training: the points it builds for

    @property
    def is_array(self) -> bool:
        return not backends.of(self.cfgs[0]).foreground and len(self.cfgs) > 1


def plan_jobs(cfgs: list[Config]) -> list[PlannedJob]:
    """The jobs ``cfgs`` mean, in the order they must be submitted."""
    tasks = {cfg.task for cfg in cfgs}
    if len(tasks) > 1:
        raise ConfigError(f"task: the points ask for different tasks {sorted(tasks)}. Fix: sweep one task")
    kinds = TASK_JOBS[tasks.pop()]
    planned: list[PlannedJob] = []
    if "cache" in kinds:  # one array per point: its data.cache_shards tasks build one entry together
        for i, point in enumerate(cfgs):
            planned.append(_cache_array(point, [i]))
    elif "train" in kinds:  # data.cache_shards > 1: the array builds the cache first, training waits on it
        planned += [_cache_array(cfgs[group[0]], group) for group in _cache_groups(cfgs)]
    if "train" in kinds:
        groups: list[list[int]] = []  # one array per group of points whose cluster settings agree
        for i, cfg in enumerate(cfgs):
            group = next((g for g in groups if _train_size(cfgs[g[0]]) == _train_size(cfg)), None)
            if group is None:
                groups.append([i])
            else:
                group.append(i)
        chained = {point for job in planned for point in job.serves}
        for group in groups:
            after = "cache" if chained & set(group) else None
            planned.append(
                PlannedJob(
                    "train", [cfgs[i] for i in group], [TrainJob(cfgs[i]) for i in group], group, after
                )
            )
    if "generate" in kinds:
        after = "train" if "train" in kinds else None
        for i, point in enumerate(cfgs):
            # the job carries the settings it runs with: the script is rendered from them, and inside the
            # job they say its GPUs and time limit (to tell a time-out from a preemption)
            cfg = dataclasses.replace(point, cluster=point.cluster.for_job("generate"))
            shards = range(cfg.generate.shards)
            planned.append(
                PlannedJob(
                    "generate",
                    [cfg] * len(shards),
                    [GenerateJob(cfg, k) for k in shards],
                    [i] * len(shards),
                    after,
                )
            )
    return planned


def _cache_array(point: Config, serves: list[int]) -> PlannedJob:
    """The ``data.cache_shards`` tasks that build ``point``'s latent-cache entry together (``task=cache``,
    or ahead of the training of the points ``serves`` lists)."""
    cfg = dataclasses.replace(point, cluster=point.cluster.for_job("cache"))
    shards = range(cfg.data.cache_shards)
    fns = [CacheJob(cfg, k) for k in shards]
    return PlannedJob("cache", [cfg] * len(shards), fns, [serves[0]] * len(shards), serves=serves)


def _cache_groups(cfgs: list[Config]) -> list[list[int]]:
    """The training points whose latent cache is built by an array first (``data.cache`` on, with
    ``data.cache_shards`` > 1), grouped by what the entry's key reads of the config: a learning-rate sweep
    over one dataset builds its one entry once, not once per point, each array racing the others."""
    groups: dict[str, list[int]] = {}
    for i, cfg in enumerate(cfgs):
        if cfg.data.cache and cfg.data.cache_shards > 1:
            groups.setdefault(_cache_identity(cfg), []).append(i)
    return list(groups.values())


def _cache_identity(cfg: Config) -> str:
    """What of the config a latent-cache entry's key holds (:func:`sdcluster.identity.latent_cache_key`),
    and where the array writes it: points equal here build the same entry."""
    from sdcluster.identity import stable_hash

    t = cfg.train
    parts = [cfg.model, cfg.data, t.resolution, t.center_crop, t.random_flip, t.mixed_precision]
    parts += [cfg.cache_root, cfg.cluster.for_job("cache")]
    return stable_hash([dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts], 16)


def _train_size(cfg: Config) -> Any:
    """What a training job asks of the scheduler: points that differ only in the generation job's sizes
    still train as one array."""
    return dataclasses.replace(cfg.cluster.for_job("train"), generate=GenerationResources())


def job_script(job: PlannedJob, after_id: str | None) -> str:
    """The script the scheduler would get for ``job``, without submitting (``launch.dry_run=true``)."""
    cfg = job.cfgs[0]
    size = len(job.cfgs) if job.is_array else None
    return backends.of(cfg).script(cfg, paths.submitit_folder(cfg), f"sdcluster-{job.kind}", after_id, size)


def record_submission(cfg: Config, job: submitit.Job, kind: str, extra: dict[str, Any]) -> Path:
    """Write ``config.yaml`` and ``job.json`` beside submitit's script and logs in ``jobs/<job_id>/``."""
    folder = paths.job_dir(cfg, job.job_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config_yaml(cfg))
    fields = {
        "job_id": job.job_id,
        "task": kind,
        "cluster": backends.of(cfg).name,
        "run_dir": str(paths.run_dir(cfg)),
        "submitted": records.now(),
        "world_size": cfg.cluster.world_size,
        **{k: v for k, v in extra.items() if v is not None},
    }
    records.update(folder, {"state": "SUBMITTED"}, keep_existing=True)
    records.update(folder, fields)
    records.index_job(job.job_id, folder, backends.of(cfg).cluster_name())
    return folder


def _dependency(job: PlannedJob, points: list[int], planned: list[PlannedJob]) -> str | None:
    """The job ids the elements of ``job`` for ``points`` wait on (afterok), ``:``-separated: a generation
    array its point's training (that array element), a training job every task of each cache array it
    reads (the whole array, by its base id)."""
    if job.after is None:
        return None
    if job.after == "cache":
        arrays = [p for p in planned if p.kind == "cache" and set(p.serves) & set(points)]
        return ":".join(p.job_ids[0].split("_")[0] for p in arrays)
    earlier = next(p for p in planned if p.kind == job.after and points[0] in p.points)
    return earlier.job_ids[earlier.points.index(points[0])]


def _submit_one(job: PlannedJob, after_id: str | None, extra: dict[str, Any]) -> list[submitit.Job]:
    cfg = job.cfgs[0]
    backend = backends.of(cfg)
    after = None if backend.foreground else after_id  # a foreground job starts once the earlier one ended
    # jobs/<id>/ holds pickles and a script run as the user: created (by submitit, then by the job itself,
    # which inherits the umask) writable by the owner only; the run folder (claim below) follows the umask
    jobs_root = Path(cfg.jobs_root)
    with (
        atomic.submission_umask(paths.jobs_umask(cfg)),
        atomic.explain_disk_full(jobs_root, setting="jobs_root"),
    ):
        executor = backend.executor(cfg, paths.submitit_folder(cfg), f"sdcluster-{job.kind}", after)
        if job.is_array:
            with executor.batch():
                submitted = [executor.submit(fn) for fn in job.fns]
        else:
            with children_ignore_sigint(backend.foreground):
                submitted = [executor.submit(fn) for fn in job.fns]
    for index, (element_cfg, sjob) in enumerate(zip(job.cfgs, submitted, strict=True)):
        array_index = index if job.is_array else None
        stop = backend.stop_hint(sjob.job_id)
        queued = f": job {sjob.job_id} is submitted all the same ({stop} if it should not run)"
        with (
            atomic.umask(paths.jobs_umask(element_cfg)),
            atomic.explain_disk_full(jobs_root, resume=queued, setting="jobs_root"),
        ):
            folder = record_submission(
                element_cfg, sjob, job.kind, {**extra, "array_index": array_index, "after": after_id}
            )
        if job.kind == "cache":  # no output folder to own: pieces and the entry publish by rename, locked
            continue
        writes = paths.run_dir(element_cfg) if job.kind == "train" else paths.generation_dir(element_cfg)
        shards = job.kind == "generate"  # the tasks of a generation array fill one folder together
        with atomic.explain_disk_full(writes, resume=queued, setting="output_root"):
            ownership.claim(writes, sjob.job_id, backend.name, folder, whole_array=shards)
    return submitted


def submit_configs(
    cfgs: list[Config],
    say: Say = print,
    wait: Callable[[submitit.Job, str], bool] | None = None,
    extra: dict[str, Any] | None = None,
) -> list[PlannedJob] | None:
    """Submit every job ``cfgs`` mean; returns the plan with its job ids, or None if a waited job failed.

    ``wait(job, kind)`` is called for every job when given, and always on the local executor before a job
    that depends on it is started. Locally, array elements run one after another.
    """
    planned = plan_jobs(cfgs)
    foreground = backends.of(cfgs[0]).foreground  # one job at a time, each waited for
    for cfg in {cfg.jobs_root: cfg for cfg in reversed(cfgs)}.values():  # each jobs_root once, first point
        paths.private_jobs_root(cfg)
    for job in planned:
        groups = [[k] for k in range(len(job.fns))] if foreground else [list(range(len(job.fns)))]
        for group in groups:
            part = dataclasses.replace(
                job, cfgs=[job.cfgs[k] for k in group], fns=[job.fns[k] for k in group]
            )
            points = [job.points[k] for k in group]
            submitted = _submit_one(part, _dependency(job, points, planned), extra or {})
            for sjob in submitted:
                job.job_ids.append(sjob.job_id)
                say(
                    f"submitted {job.kind} job {sjob.job_id}: "
                    f"jobs folder {paths.job_dir(job.cfgs[0], sjob.job_id)}"
                )
                say(f"  follow it: python -m sdcluster.logs {sjob.job_id} --follow")
            waiter = wait or (functools.partial(_local_wait, say=say) if foreground else None)
            if waiter is not None and not all(waiter(sjob, job.kind) for sjob in submitted):
                return None
    return planned


def _local_wait(job: submitit.Job, kind: str, say: Say = print) -> bool:
    """Wait for a local job nobody asked to follow; Ctrl-C stops it with a checkpoint, as when followed."""
    with sigint_interrupts():
        try:
            job.results()
        except KeyboardInterrupt:
            stop_local(job, say)
            with contextlib.suppress(Exception):  # it ends stopped: a failure to submitit
                job.results()
            return False
        except Exception:
            return False
    return True


def describe_dry_run(cfgs: list[Config], say: Say) -> None:
    """What :func:`submit_configs` would submit: each job (or array) with its exact sbatch script."""
    planned = plan_jobs(cfgs)
    for n, job in enumerate(planned):
        points = sorted(set(job.serves or job.points))
        after = f"{job.after} job of point {points[0]}" if job.after else None
        shape = f"array of {len(job.cfgs)} tasks" if job.is_array else f"{len(job.cfgs)} job(s)"
        if job.kind == "generate":  # counted, not listed (sdcluster.generate.plan_count)
            from sdcluster.generate.plan_count import count_plan

            shape += f" making {count_plan(job.cfgs[0].generate).total:,} images"
        say(
            f"# job {n}: {job.kind}, {shape}, points {points}"
            + (f", afterok on the {after}" if after else "")
        )
        say(f"# each {'task' if job.is_array else 'job'} asks for {_resources(job.cfgs[0])}")
        placeholder = f"{job.after or ''}-JOB-OF-POINT-{points[0]}".upper()  # real once that one is queued
        say(job_script(job, placeholder if after else None))


def _resources(cfg: Config) -> str:
    """The size of one job (or array task) in words, as its script asks for it; unset values are left to
    the scheduler's defaults and not named."""
    c = cfg.cluster
    per_node = f"{c.gpus_per_node} GPU(s)" if c.gpus_per_node else f"{c.tasks_per_node} process(es)"
    words = [f"{c.nodes} node(s) x {per_node} ({c.world_size} process(es) in all)", f"{c.timeout_min} min"]
    if c.cpus_per_task:
        words.append(f"{c.cpus_per_task} CPU(s) per process")
    if c.mem_gb:
        words.append(f"{c.mem_gb} GB per node")
    if c.partition:
        words.append(f"partition {c.partition}")
    return ", ".join(words)
