"""Hydra's side of the schema: register it and the sweep launcher, find ``conf/``, ``${sdc_asset:...}``.

Kept apart from the schema modules so that job functions, which receive plain dataclasses, never import Hydra.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from sdcluster.config import Config

SCHEMA_NAME = "sdcluster_schema"
LAUNCHER = "hydra_plugins.sdcluster_launcher.launcher.SdclusterLauncher"
_PACKAGE = Path(__file__).resolve().parents[1]


def conf_dir() -> Path:
    """The shipped config tree: ``conf/`` beside the package in a checkout, else ``sdcluster/conf``."""
    checkout = _PACKAGE.parent / "conf"
    return checkout if (checkout / "config.yaml").is_file() else _PACKAGE / "conf"


def register() -> None:
    """Idempotent: safe to call from the entry point and from tests."""
    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=Config)
    store.store(group="hydra/launcher", name="sdcluster", node={"_target_": LAUNCHER}, provider="sdcluster")
    if not OmegaConf.has_resolver("sdc_asset"):
        OmegaConf.register_new_resolver("sdc_asset", lambda name: str(_PACKAGE / "assets" / name))
