"""From Hydra's composed tree (or a list of overrides) to a checked :class:`~sdcluster.config.Config`.

The one way a config is built from ``conf/``: ``python -m sdcluster.launch`` (through ``hydra.main``, which
adds the check of the executor choice), the sweep launcher plugin, ``python -m sdcluster.models fetch`` and
the tests all end here, so each sees the same keys refused, the same paths made absolute and the same tokens
refused. Hydra's compose API is imported only by :func:`compose`: a job never composes.

It sits just above the schema, :mod:`sdcluster.paths` (making paths absolute) and :mod:`sdcluster.redaction`
(refusing a token), and below everything that composes: the entry point and ``models/__main__``.
"""

from __future__ import annotations

import dataclasses
import warnings

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from sdcluster.config import Config, ConfigError
from sdcluster.config.keys import check_known_keys
from sdcluster.config.store import conf_dir, config_groups, register
from sdcluster.paths import absolutize
from sdcluster.redaction import reject_secrets


def build_config(dcfg: DictConfig) -> Config:
    """Check every key against the schema, resolve interpolations, build the dataclasses (running their
    checks), make paths absolute, refuse a token."""
    check_known_keys(dcfg, config_groups())
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
    cfg = absolutize(cfg)
    _program_replaces_default_prompts(cfg)
    # before anything is written: a sweep hands every point here before any of them runs or is submitted
    reject_secrets(dataclasses.asdict(cfg))
    return cfg


def _program_replaces_default_prompts(cfg: Config) -> None:
    """With a prompt program (``generate.prompts_file=PROGRAM.yaml``) the schema's sample prompts are dropped.

    The composed tree cannot say whether ``generate.prompts`` was typed or is the default: only a value
    equal to the schema's default (the demo's jeans prompts) counts as not asked for, so prompts typed on the
    command line (or set in ``conf/local/``) still join the program as literal templates.
    """
    from sdcluster.config.data import SAMPLE_PROMPTS
    from sdcluster.config.generate import is_program_file

    if is_program_file(cfg.generate.prompts_file) and cfg.generate.prompts == list(SAMPLE_PROMPTS):
        cfg.generate.prompts = []


def compose(overrides: list[str]) -> Config:
    """The config ``launch`` would build from these overrides (package ``conf/``, ``conf/local/`` of the
    working directory, then ``overrides``), without the executor check only a launch can make."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()  # idempotent; the schema must be in Hydra's ConfigStore before conf/config.yaml names it
    with warnings.catch_warnings():
        # conf/ of the working directory is on the search path for conf/local/; most directories have none
        warnings.filterwarnings("ignore", message="provider=hydra.searchpath in main, path=conf is not")
        with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
            return build_config(hydra_compose(config_name="config", overrides=overrides))
