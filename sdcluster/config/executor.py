"""Where the jobs will run must be what the user chose: no silent fallback to this machine.

The ``cluster`` group is not in the defaults list (``+cluster=slurm`` appends it), so a launch without it runs
the local executor with the schema's cluster defaults. Two mistakes then run a training on the login node:
SLURM settings given without choosing SLURM (``cluster.partition=gpu`` alone, or after a misspelled group),
and a real training launched from a login node without any cluster choice. Both are refused here, at launch,
with the fix. ``chosen`` is Hydra's choice for the group (``hydra.runtime.choices.cluster``): None when no
``+cluster=...`` was given.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from sdcluster.config.checks import ConfigError
from sdcluster.config.cluster import ClusterConfig
from sdcluster.config.model import EMBEDDED
from sdcluster.config.train import TrainConfig

if TYPE_CHECKING:
    from sdcluster.config import Config

SLURM_ONLY = (
    "name",
    "partition",
    "account",
    "qos",
    "nodes",
    "tasks_per_node",
    "cpus_per_task",
    "mem_gb",
    "constraint",
    "exclude",
    "signal_delay_s",
    "max_requeues",
    "max_timeouts",
    "setup",
    "additional_parameters",
    "array_parallelism",
)
"""``cluster.*`` keys only a SLURM job uses (the local executor reads timeout_min and gpus_per_node)."""

SLURM_CONF = "/etc/slurm/slurm.conf"
"""Where SLURM's clients read the cluster's config when ``SLURM_CONF`` is not set."""


def check_slurm_settings_need_slurm(cfg: Config, chosen: str | None) -> None:
    """Refuse SLURM settings when no executor was chosen: they would be ignored by the local executor."""
    if chosen is not None:
        return
    default = ClusterConfig()
    changed = [key for key in SLURM_ONLY if getattr(cfg.cluster, key) != getattr(default, key)]
    if changed:
        raise ConfigError(
            f"cluster.{changed[0]}: is a SLURM setting, but no executor was chosen, so the jobs would run "
            "on this machine with the local executor and ignore it. Fix: add +cluster=slurm (which also "
            "applies your conf/local/cluster.yaml)"
        )


def login_node(environ: Mapping[str, str]) -> str | None:
    """Why this machine looks like a SLURM login node (sbatch and a readable SLURM config, not inside a job),
    or None."""
    if environ.get("SLURM_JOB_ID"):
        return None
    sbatch = shutil.which("sbatch", path=environ.get("PATH", os.defpath))
    conf = environ.get("SLURM_CONF") or SLURM_CONF
    if sbatch is None or not (Path(conf).is_file() and os.access(conf, os.R_OK)):
        return None
    return f"sbatch is {sbatch}, the SLURM config {conf} is readable, and this is not a SLURM job"


def heavier_than_demo(cfg: Config) -> list[str]:
    """What makes the launch more than the demo (the tiny model on the sample data at the schema's sizes)."""
    demo = TrainConfig()
    heavier = []
    if cfg.model.path not in EMBEDDED:
        heavier.append(f"model.path={cfg.model.path} is not an embedded tiny model")
    if cfg.task != "generate":
        if cfg.train.max_steps > demo.max_steps:
            heavier.append(f"train.max_steps={cfg.train.max_steps} > {demo.max_steps}")
        if cfg.train.resolution > demo.resolution:
            heavier.append(f"train.resolution={cfg.train.resolution} > {demo.resolution}")
    return heavier


def check_local_on_login_node(cfg: Config, chosen: str | None, environ: Mapping[str, str]) -> None:
    """Refuse a local job heavier than the demo on what looks like a login node, unless +cluster=local."""
    if cfg.cluster.name != "local" or chosen == "local":
        return
    where, heavier = login_node(environ), heavier_than_demo(cfg)
    if where and heavier:
        raise ConfigError(
            f"cluster: this machine looks like a SLURM login node ({where}), and without +cluster=... the "
            f"job would run here with the local executor: {'; '.join(heavier)}. Fix: add +cluster=slurm to "
            "submit it to the cluster, or +cluster=local to run it on this machine on purpose"
        )


def check_executor(cfg: Config, chosen: str | None, environ: Mapping[str, str] | None = None) -> None:
    """Both checks of this module, in the order a user would fix them."""
    check_slurm_settings_need_slurm(cfg, chosen)
    check_local_on_login_node(cfg, chosen, os.environ if environ is None else environ)
