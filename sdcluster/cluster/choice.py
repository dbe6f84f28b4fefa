"""Where the jobs will run must be what the user chose: no silent fallback to this machine.

The ``cluster`` group is not in the defaults list (``+cluster=NAME`` appends it), so a launch without it runs
on the schema's default backend (``cluster.name``'s default, the one that runs jobs on this machine). Two
mistakes then run a training on the login node: settings only another backend reads given without choosing
it (``cluster.partition=gpu`` alone, or after a misspelled group), and a real training launched from what
looks like another backend's login node without any cluster choice. Both are refused here, at launch, with
the fix. ``chosen`` is Hydra's choice for the group (``hydra.runtime.choices.cluster``): None when no
``+cluster=...`` was given. Each backend says which ``cluster.*`` keys only it reads and whether this
machine looks like its login node; nothing here names one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from sdcluster.cluster import backends
from sdcluster.config import ClusterConfig, Config, ConfigError, TrainConfig
from sdcluster.config.train import DEFAULT_MAX_STEPS
from sdcluster.model_source import is_embedded


def check_own_keys_need_their_backend(cfg: Config, chosen: str | None) -> None:
    """Refuse a setting only another backend reads when no backend was chosen: the default backend would
    run the jobs and ignore it."""
    if chosen is not None:
        return
    default = ClusterConfig()
    running = backends.get(default.name)
    if cfg.cluster.name != default.name:  # cluster.name=X typed without +cluster=X: X's yaml was skipped
        _refuse_unchosen("name", backends.of(cfg), running)
    for backend in backends.registered():
        if backend.name == running.name:
            continue
        for key in backend.own_keys():
            if getattr(cfg.cluster, key) != getattr(default, key):
                _refuse_unchosen(key, backend, running)


def _refuse_unchosen(key: str, backend: backends.Backend, running: backends.Backend) -> None:
    raise ConfigError(
        f"cluster.{key}: is a {backend.title} setting, but no executor was chosen, so the jobs would run "
        f"on this machine with the {running.title} executor and ignore it. Fix: add +cluster={backend.name} "
        "(which also applies your conf/local/cluster.yaml)"
    )


def heavier_than_demo(cfg: Config) -> list[str]:
    """What makes the launch more than the demo (the tiny model on the sample data at the schema's sizes)."""
    demo = TrainConfig()
    heavier = []
    if not is_embedded(cfg.model.path):
        heavier.append(f"model.path={cfg.model.path} is not an embedded tiny model")
    if cfg.task != "generate":
        if cfg.train.max_steps is None:  # train.epochs: its steps are counted from the data at submission
            heavier.append(f"train.epochs={cfg.train.epochs} (an unknown number of steps)")
        elif cfg.train.max_steps > DEFAULT_MAX_STEPS:
            heavier.append(f"train.max_steps={cfg.train.max_steps} > {DEFAULT_MAX_STEPS}")
        if cfg.train.resolution > demo.resolution:
            heavier.append(f"train.resolution={cfg.train.resolution} > {demo.resolution}")
    return heavier


def check_here_on_a_login_node(cfg: Config, chosen: str | None, environ: Mapping[str, str]) -> None:
    """Refuse a job heavier than the demo that would run on this machine, when this machine looks like the
    login node of a scheduler, unless a backend was chosen on purpose (``+cluster=NAME``)."""
    running = backends.of(cfg)
    if chosen is not None or not running.foreground:
        return
    heavier = heavier_than_demo(cfg)
    for backend in backends.registered():
        where = backend.login_node(environ) if backend.name != running.name else None
        if where and heavier:
            raise ConfigError(
                f"cluster: this machine looks like a {backend.title} login node ({where}), and without "
                f"+cluster=... the job would run here with the {running.title} executor: "
                f"{'; '.join(heavier)}. Fix: add +cluster={backend.name} to submit it to the cluster, or "
                f"+cluster={running.name} to run it on this machine on purpose"
            )


def check_choice(cfg: Config, chosen: str | None, environ: Mapping[str, str] | None = None) -> None:
    """Both checks of this module, in the order a user would fix them."""
    check_own_keys_need_their_backend(cfg, chosen)
    check_here_on_a_login_node(cfg, chosen, os.environ if environ is None else environ)
