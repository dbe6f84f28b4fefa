"""Hydra's side of the schema: register it, the sweeper and launcher, find ``conf/``, ``${sdc_asset:...}``.

Kept apart from the schema modules so that job functions, which receive plain dataclasses, never import Hydra:
Hydra and the schema are imported only inside :func:`register`, so the schema may ask :func:`conf_dir` what
the config tree offers (``cluster.name``'s values are the files of ``conf/cluster/``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

SCHEMA_NAME = "sdcluster_schema"
LAUNCHER = "hydra_plugins.sdcluster_launcher.launcher.SdclusterLauncher"
SWEEPER = "hydra_plugins.sdcluster_launcher.sweeper.SdclusterSweeper"
_PACKAGE = Path(__file__).resolve().parents[1]
SITE_SETTINGS = "local"
"""The gitignored folder of ``conf/`` that holds a site's settings (``conf/local/cluster.yaml``): no group."""


def conf_dir() -> Path:
    """The shipped config tree: ``conf/`` beside the package in a checkout, else ``sdcluster/conf``."""
    checkout = _PACKAGE.parent / "conf"
    return checkout if (checkout / "config.yaml").is_file() else _PACKAGE / "conf"


def config_groups() -> list[str]:
    """The config groups of ``conf/`` (``model``, ``experiment``, ...), ``local/`` (site settings) aside."""
    return sorted(p.name for p in conf_dir().iterdir() if p.is_dir() and p.name != SITE_SETTINGS)


def options(group: str) -> tuple[str, ...]:
    """The options of a config group: the names of its ``conf/<group>/*.yaml`` files, sorted."""
    return tuple(sorted(p.stem for p in (conf_dir() / group).glob("*.yaml")))


def schema_node(optim: str | None = None) -> Any:
    """The schema as an OmegaConf node, its ``optim`` node typed for optimizer ``optim``, or (None) as the
    shared base that each ``conf/optim/<name>.yaml`` replaces with its own schema: OmegaConf merges a node
    only into its own class or a base of it, and the dataclass default is AdamW's."""
    from omegaconf import OmegaConf

    from sdcluster.config import Config
    from sdcluster.config.optim import OptimBase, optim_schema

    node = OmegaConf.structured(Config)
    node.optim = OmegaConf.structured(optim_schema(optim) if optim else OptimBase)
    return node


def schema_for(tree: Mapping[str, Any]) -> Any:
    """The schema node to merge a config written before into (a run's ``config.yaml``, a sweep point): typed
    for the optimizer it names (AdamW where it names none, as every config before the others existed)."""
    return schema_node((tree.get("optim") or {}).get("name") or "adamw")


def optim_schema_name(name: str) -> str:
    """The config-store name of optimizer ``name``'s schema, which ``conf/optim/<name>.yaml`` extends."""
    return f"{name}_schema"


def register() -> None:
    """Idempotent: safe to call from the entry point and from tests."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from sdcluster.config.optim import OPTIMIZERS

    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=schema_node())
    for name, schema in OPTIMIZERS.items():  # Hydra's schema-extending pattern: the YAML's defaults name it
        store.store(group="optim", name=optim_schema_name(name), node=schema, provider="sdcluster")
    store.store(group="hydra/launcher", name="sdcluster", node={"_target_": LAUNCHER}, provider="sdcluster")
    sweeper = {"_target_": SWEEPER, "max_batch_size": None, "params": None}  # every point in one batch
    store.store(group="hydra/sweeper", name="sdcluster", node=sweeper, provider="sdcluster")
    if not OmegaConf.has_resolver("sdc_asset"):
        OmegaConf.register_new_resolver("sdc_asset", lambda name: str(_PACKAGE / "assets" / name))
