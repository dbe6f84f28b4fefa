"""Cluster backends: what differs between schedulers, behind one protocol (:class:`.base.Backend`).

``local`` runs jobs as subprocesses of the launcher; ``slurm`` submits them with sbatch through submitit.
On the login and job sides this package is the only place that names a scheduler, its commands or its
environment variables, and :func:`of` picks the backend from ``cluster.name``. The config layer below it
names none: the values of ``cluster.name`` are the option files of ``conf/cluster/``, and what a config
needs of its executor (keys only one backend reads, a login node, one local process, GPUs for mixed
precision, a signal before the time limit) each backend checks (:mod:`sdcluster.cluster.choice`, preflight).
It sits at the base of the cluster wing: it may import :mod:`sdcluster.config` and submitit, nothing else
of sdcluster; the login side (:mod:`sdcluster.cluster`) and the job (:mod:`sdcluster.runtime`) both ask it.

Adding a scheduler (PBS, LSF, Kubernetes) touches three files: write ``backends/<name>.py`` with a class
that has the attributes and methods of :class:`.base.Backend` (an executor from submitit or a plugin of
it, the state queries, the keys only it reads, how its login node looks, the checks before queueing, the
job's environment), register it in ``_BACKENDS`` below, and add ``conf/cluster/<name>.yaml`` (which makes
``+cluster=<name>`` and ``cluster.name=<name>`` valid; a test keeps the two lists in step). Submission,
dry run, records, logs, status, sweeps, the launch's cluster-choice checks and the requeue protocol ask
the backend and need no change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdcluster.cluster.backends.base import LIVE, Backend, JobEnvironment
from sdcluster.cluster.backends.local import LocalBackend
from sdcluster.cluster.backends.slurm import SlurmBackend

if TYPE_CHECKING:
    from sdcluster.config import Config

__all__ = ["LIVE", "Backend", "JobEnvironment", "environment", "get", "job_state", "of", "registered"]

_BACKENDS: dict[str, Backend] = {b.name: b for b in (LocalBackend(), SlurmBackend())}


def get(name: str) -> Backend:
    """The backend called ``name`` (a ``cluster.name``, or the ``cluster`` a job record names)."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"no cluster backend {name!r}; known: {', '.join(_BACKENDS)}") from None


def registered() -> tuple[Backend, ...]:
    """Every backend, in registration order (the checks of a launch's cluster choice ask each)."""
    return tuple(_BACKENDS.values())


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


def clusters_here() -> set[str]:
    """The clusters this machine reaches (each backend's ``cluster_name`` where its scheduler answers):
    a job indexed on one of them is the one meant by its id."""
    return {name for backend in _BACKENDS.values() if (name := backend.cluster_name())}


def environment() -> JobEnvironment:
    """This process's job environment: the one of the backend whose scheduler runs it, else the default
    (a local job, or no job at all). Read on the compute node, where no config says the backend yet."""
    for backend in _BACKENDS.values():
        env = backend.job_environment()
        if env.inside:
            return env
    return JobEnvironment()
