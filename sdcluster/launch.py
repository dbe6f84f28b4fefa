"""Entry point: ``python -m sdcluster.launch [+cluster=slurm] [overrides]`` (``-m`` for a sweep).

Hydra composes the config tree (the package's ``conf/``, then ``conf/local/`` of the working directory for
site settings, then the command line), the schema in :mod:`sdcluster.config` validates it, and
:func:`sdcluster.cluster.submit_and_wait.launch` checks what it can on this node and submits. A multirun goes
through Hydra's launcher plugin (``hydra_plugins/sdcluster_launcher``) to :mod:`sdcluster.sweep`. The job
functions never see Hydra.

    python -m sdcluster.launch                                  # tiny model, sample data, local executor
    python -m sdcluster.launch +cluster=slurm cluster.partition=gpu cluster.gpus_per_node=4
    python -m sdcluster.launch -m +cluster=slurm optim.lr=1e-5,5e-6
    python -m sdcluster.launch experiment=sd15_full data.path=DIR +cluster=slurm   # or sd15_lora, sdxl_lora
    python -m sdcluster.launch +cluster=local train.max_steps=1000   # a real job on this machine, on purpose

Nothing typed is dropped: an unknown key or group is refused with or without ``+``
(:mod:`sdcluster.config.keys`), and so are SLURM settings without ``+cluster=slurm`` and a real training
about to run on a login node (:mod:`sdcluster.cluster.choice`).
"""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from collections.abc import Mapping
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sdcluster.atomic import DiskFullError
from sdcluster.cluster.choice import check_choice
from sdcluster.compose import build_config
from sdcluster.config import Config, ConfigError
from sdcluster.config.keys import is_known, refuse
from sdcluster.config.store import conf_dir, config_groups, register
from sdcluster.redaction import reject_secrets_in_arguments

register()
# conf/ of the working directory is on the search path for conf/local/; most directories have none.
warnings.filterwarnings("ignore", message="provider=hydra.searchpath in main, path=conf is not available")


def to_config(dcfg: DictConfig, choices: Mapping[str, Any] | None = None) -> Config:
    """Check every key against the schema, resolve interpolations, build the dataclasses (running their
    checks), make paths absolute, refuse a token (:func:`sdcluster.compose.build_config`).

    ``choices``: Hydra's group choices (``hydra.runtime.choices``) where the config is to be launched; then
    the choice of executor is checked too (:mod:`sdcluster.cluster.choice`). Without them (a plain
    ``compose``, as in tests) it is not: nothing says whether ``+cluster=...`` was given.
    """
    cfg = build_config(dcfg)
    if choices is not None:
        check_choice(cfg, choices.get("cluster"))
    return cfg


def fail(err: ConfigError) -> NoReturn:
    print(f"sdcluster: configuration error: {err}", file=sys.stderr)
    sys.exit(2)


def fail_disk_full(err: DiskFullError) -> NoReturn:
    """Explained already (which folder, how much is free, the fix): one line, no traceback."""
    print(f"sdcluster: {err}", file=sys.stderr)
    sys.exit(1)


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="config")
def main(dcfg: DictConfig) -> None:
    from sdcluster.cluster.submit_and_wait import launch

    try:
        code = launch(to_config(dcfg, HydraConfig.get().runtime.choices))
    except ConfigError as err:
        fail(err)
    except DiskFullError as err:
        fail_disk_full(err)
    if code:
        sys.exit(code)


def check_override_keys(arguments: list[str]) -> None:
    """Refuse an override of a key the schema lacks, with or without ``+``, before Hydra composes.

    Hydra refuses ``train.max_stpes=100`` itself, but its advice is ``+train.max_stpes=100``; a key added
    so is refused after composition (:func:`check_known_keys`). Checking the command line first gives both
    spellings the same answer: the key that was meant.
    """
    from hydra._internal.utils import get_args_parser  # the parser hydra.main itself uses
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        # silenced: Hydra parses the same arguments again and prints (--version, --help, a usage error) once
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            parsed = get_args_parser().parse_known_args(arguments)[0]
        overrides = OverridesParser.create().parse_overrides(parsed.overrides)
    except (HydraException, SystemExit):
        return  # malformed: Hydra says what is wrong when it parses them again
    groups = config_groups()
    for override in overrides:
        key = override.key_or_group
        if override.is_delete() or key.split(".")[0] == "hydra" or {"@", "/"} & set(key) or key in groups:
            continue
        if not is_known(key, Config):
            raise refuse(key, override.input_line.split("=", 1)[-1], Config, groups)


def run() -> None:
    """Refuse a token or an unknown key on the command line before Hydra writes anything, then compose and
    launch."""
    try:
        reject_secrets_in_arguments(sys.argv[1:])
        check_override_keys(sys.argv[1:])
    except ConfigError as err:
        fail(err)
    main()


if __name__ == "__main__":
    run()
