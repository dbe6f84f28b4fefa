"""Entry point: ``python -m sdcluster.launch [+cluster=slurm] [overrides]`` (``-m`` for a sweep).

Hydra composes ``conf/``, the schema in :mod:`sdcluster.config` validates it, and :mod:`sdcluster.runner`
checks what it can on this node and submits. The job functions never see Hydra.

    python -m sdcluster.launch                                  # tiny model, sample data, local executor
    python -m sdcluster.launch +cluster=slurm cluster.partition=gpu cluster.gpus_per_node=4
    python -m sdcluster.launch -m +cluster=slurm optim.lr=1e-5,5e-6
    python -m sdcluster.launch experiment=jeans_sd14 data=imagefolder data.path=DIR +cluster=slurm

A sweep on SLURM is collected point by point while Hydra runs its multirun, then validated and submitted as
one job array after Hydra returns (:mod:`sdcluster.sweep`): the login node never waits on the jobs. With the
local executor the points simply run one after another.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from sdcluster.conf_store import register
from sdcluster.config import Config, ConfigError
from sdcluster.paths import absolutize

register()

_SWEEP_POINTS: list = []  # sweep.Point objects collected during a SLURM multirun


def to_config(dcfg: DictConfig) -> Config:
    """Resolve interpolations, build the dataclasses (running their checks), make paths absolute."""
    try:
        cfg = OmegaConf.to_object(dcfg)
    except MissingMandatoryValue as err:
        raise ConfigError(
            f"{err.full_key}: has no value. Fix: set {err.full_key}=... on the command line"
        ) from None
    except OmegaConfBaseException as err:
        cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else None
        raise cause or ConfigError(str(err)) from None
    assert isinstance(cfg, Config)
    return absolutize(cfg)


def _fail(err: ConfigError) -> None:
    print(f"sdcluster: configuration error: {err}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(dcfg: DictConfig) -> None:
    try:
        cfg = to_config(dcfg)
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN and cfg.cluster.name == "slurm" and not cfg.launch.dry_run:
            from sdcluster.sweep import Point

            _SWEEP_POINTS.append(Point(cfg, list(hydra_cfg.overrides.task)))
            return
        from sdcluster.runner import launch

        code = launch(cfg)
    except ConfigError as err:
        _fail(err)
    if code:
        sys.exit(code)


def run() -> None:
    """Hydra first (composition, multirun expansion), then the collected sweep, if any."""
    main()
    if _SWEEP_POINTS:
        from sdcluster.sweep import submit_sweep

        try:
            sys.exit(submit_sweep(_SWEEP_POINTS))
        except ConfigError as err:
            _fail(err)


if __name__ == "__main__":
    run()
