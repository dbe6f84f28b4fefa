"""Cluster backends: what differs between schedulers, behind one protocol (:class:`.base.Backend`).

``local`` runs jobs as subprocesses of the launcher; ``slurm`` submits them with sbatch through submitit.
On the login and job sides this package is the only place that names a scheduler, its commands or its
environment variables, and :func:`of` picks the backend from ``cluster.name``. (The config layer below it
still knows the two names: ``config/executor.py`` refuses SLURM-only keys without SLURM and recognises a
login node, and ``config/__init__.py`` checks per executor; the loop and the generation job read
``cluster.name`` for log lines.) It sits at the base of the cluster wing: it may
import :mod:`sdcluster.config` and submitit, nothing else of sdcluster; the login side
(:mod:`sdcluster.cluster`) and the job (:mod:`sdcluster.runtime`) both ask it.

Adding a scheduler (PBS, LSF, Kubernetes): write ``backends/<name>.py`` with a class that has the
attributes and methods of :class:`.base.Backend` (an executor from submitit or a plugin of it, the state
queries, the checks before queueing, the job's environment), register it in ``_BACKENDS`` below, add
``conf/cluster/<name>.yaml`` and the name to ``CLUSTERS`` in :mod:`sdcluster.config.checks` (and its
scheduler-only keys to ``config/executor.py``). Submission, dry run, records, logs, status, sweeps and the
requeue protocol ask the backend and need no change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdcluster.cluster.backends.base import LIVE, Backend, JobEnvironment
from sdcluster.cluster.backends.local import LocalBackend
from sdcluster.cluster.backends.slurm import SlurmBackend

if TYPE_CHECKING:
    from sdcluster.config import Config

__all__ = ["LIVE", "Backend", "JobEnvironment", "environment", "get", "job_state", "of"]

_BACKENDS: dict[str, Backend] = {b.name: b for b in (LocalBackend(), SlurmBackend())}


def get(name: str) -> Backend:
    """The backend called ``name`` (a ``cluster.name``, or the ``cluster`` a job record names)."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"no cluster backend {name!r}; known: {', '.join(_BACKENDS)}") from None


def of(cfg: Config) -> Backend:
    """The backend a config submits to: the one place that reads ``cluster.name``."""
    return get(cfg.cluster.name)


def job_state(job_id: str) -> tuple[str, str] | None:
    """What any scheduler knows of ``job_id``, for a job whose record is missing or names no backend."""
    for backend in _BACKENDS.values():
        state = backend.job_state(job_id)
        if state:
            return state
    return None


def environment() -> JobEnvironment:
    """This process's job environment: the one of the backend whose scheduler runs it, else the default
    (a local job, or no job at all). Read on the compute node, where no config says the backend yet."""
    for backend in _BACKENDS.values():
        env = backend.job_environment()
        if env.inside:
            return env
    return JobEnvironment()
