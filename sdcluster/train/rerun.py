"""The command that reproduces a run, rebuilt from its resolved config (the model card prints it).

A launch records no command line, and the one typed would not be enough: ``conf/local/`` and experiment
bundles change with the directory and over time. The resolved config is what trained, so the command sets
every key of ``model``, ``data``, ``optim`` and ``train`` that is part of the run's identity, whatever the
config groups would default it to (``conf/data/sample.yaml`` sets a holdout the schema does not), and every
other key of theirs not at the schema's default; ``optim`` is chosen as its group (``optim=<name>``), since
each optimizer has its own keys. Composed again, it names the same run folder. Where things go
(``output_root``, the caches) and the cluster's own settings are left to whoever runs it.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sdcluster.config import Config

GROUPS = ("model", "data", "optim", "train")
"""The groups whose settings define a run (:func:`sdcluster.identity.semantic_train_config`)."""
TOP_LEVEL = ("task", "run_name")
LEFT_OUT = ("model.cache_dir",)  # where the site stages hub models, not what is trained

_PLAIN = re.compile(r"^[A-Za-z0-9_./:@+-]+$")
_TYPED_WORDS = {"true", "false", "null", "none", "nan", "inf", "-inf"}  # words Hydra would not read as text


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar: quoted when it would otherwise parse as something else."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    numeric = re.fullmatch(r"[-+]?[0-9._eE+-]+", text) is not None
    if _PLAIN.match(text) and text.lower() not in _TYPED_WORDS and not numeric:
        return text
    # Hydra's quoted strings: a quote is escaped with a backslash, and ${...} would be interpolated
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("${", "\\${") + "'"


def _leaves(node: Any, prefix: str = "") -> set[str]:
    """The dotted keys of a nested dict's leaves."""
    if not isinstance(node, dict):
        return {prefix[:-1]}
    return set().union(*(_leaves(v, f"{prefix}{k}.") for k, v in node.items())) if node else set()


def _chosen(node: Any, prefix: str, keep: set[str]) -> list[tuple[str, Any]]:
    """(key, value) of every leaf of the dataclass ``node`` in ``keep`` or not at its field's default."""
    found: list[tuple[str, Any]] = []
    for field in dataclasses.fields(node):
        key, value = f"{prefix}{field.name}", getattr(node, field.name)
        if key in LEFT_OUT:
            continue
        if dataclasses.is_dataclass(value):
            found += _chosen(value, f"{key}.", keep)
        elif key in keep or value != _default(field):
            found.append((key, value))
    return found


def overrides(cfg: Config) -> list[str]:
    """The overrides that compose ``cfg``'s run again from the defaults: its optimizer group first."""
    from sdcluster.config import Config
    from sdcluster.identity import semantic_train_config

    keep = _leaves(semantic_train_config(cfg)) | {"model.commit"}  # identity names the commit `revision`
    top = {f.name: f for f in dataclasses.fields(Config)}
    found = [(k, getattr(cfg, k)) for k in TOP_LEVEL if getattr(cfg, k) != _default(top[k])]
    for group in GROUPS:
        found += _chosen(getattr(cfg, group), f"{group}.", keep)
    chosen = [f"optim={cfg.optim.name}"]  # optim.name is the option (the schema refuses another)
    return chosen + [f"{k}={_hydra_value(v)}" for k, v in found if k != "optim.name"]


def launch_command(cfg: Config) -> str:
    """``sdcluster launch`` with the run's overrides (and its cluster), each quoted for the shell."""
    from sdcluster.config import ClusterConfig

    cluster = [] if cfg.cluster.name == ClusterConfig.name else [f"+cluster={cfg.cluster.name}"]
    return " \\\n  ".join(["sdcluster launch", *cluster, *(shlex.quote(o) for o in overrides(cfg))])
