"""Entry point: ``python -m sdcluster.launch [+cluster=slurm] [overrides]`` (``-m`` for a sweep).

Hydra composes the config tree (the package's ``conf/``, then ``conf/local/`` of the working directory for
site settings, then the command line), the schema in :mod:`sdcluster.config` validates it, and
:func:`sdcluster.cluster.launching.launch` checks what it can on this node and submits. A multirun goes
through Hydra's launcher plugin (``hydra_plugins/sdcluster_launcher``) to :mod:`sdcluster.sweep`. The job
functions never see Hydra.

    python -m sdcluster.launch                                  # tiny model, sample data, local executor
    python -m sdcluster.launch +cluster=slurm cluster.partition=gpu cluster.gpus_per_node=4
    python -m sdcluster.launch -m +cluster=slurm optim.lr=1e-5,5e-6
    python -m sdcluster.launch experiment=jeans_sd14 data=imagefolder data.path=DIR +cluster=slurm
"""

from __future__ import annotations

import sys
import warnings
from typing import NoReturn

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from sdcluster.config import Config, ConfigError
from sdcluster.config.store import conf_dir, register
from sdcluster.paths import absolutize
from sdcluster.redaction import reject_secrets_in_arguments

register()
# conf/ of the working directory is on the search path for conf/local/; most directories have none.
warnings.filterwarnings("ignore", message="provider=hydra.searchpath in main, path=conf is not available")


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


def fail(err: ConfigError) -> NoReturn:
    print(f"sdcluster: configuration error: {err}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
def main(dcfg: DictConfig) -> None:
    from sdcluster.cluster.launching import launch

    try:
        code = launch(to_config(dcfg))
    except ConfigError as err:
        fail(err)
    if code:
        sys.exit(code)


def run() -> None:
    """Refuse a token on the command line before Hydra writes anything, then compose and launch."""
    try:
        reject_secrets_in_arguments(sys.argv[1:])
    except ConfigError as err:
        fail(err)
    main()


if __name__ == "__main__":
    run()
