"""Registers the typed schema with Hydra and the ``${sdc_asset:...}`` resolver.

Kept apart from ``config.py`` so that job functions, which receive plain dataclasses, never import Hydra.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from sdcluster.config import Config
from sdcluster.paths import ASSETS

SCHEMA_NAME = "sdcluster_schema"


def register() -> None:
    """Idempotent: safe to call from the entry point and from tests."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)
    if not OmegaConf.has_resolver("sdc_asset"):
        OmegaConf.register_new_resolver("sdc_asset", lambda name: str(ASSETS / name))
