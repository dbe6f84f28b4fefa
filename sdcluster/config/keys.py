"""Every key of a composed config must be one the schema knows, wherever it came from.

Hydra merges YAML files and plain overrides into the schema's dataclasses in struct mode, so a misspelled
key there fails at composition. A key added with ``+`` (or ``++``) bypasses struct mode: Hydra's own error
for ``train.max_stpes=100`` even suggests ``+train.max_stpes=100``, and ``+modle=sd15`` (a group that does not
exist) becomes a plain key. ``OmegaConf.to_object`` then builds the dataclasses from their fields and drops
every extra key without a word. :func:`check_known_keys` walks the composed tree first and refuses any key
the schema lacks, with the nearest schema key or config group as a did-you-mean.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sdcluster.config.checks import ConfigError

APPENDED_GROUPS = ("cluster",)
"""Config groups that are not in ``conf/config.yaml``'s defaults list: chosen with ``+group=option``."""


def _schema_keys(schema: type, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Each dataclass node's fields: ``{"": ("task", ..., "optim", ...), "optim": ("name", "lr", ...)}``."""
    names = tuple(f.name for f in dataclasses.fields(schema))
    found = {prefix: names}
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            path = f"{prefix}.{f.name}" if prefix else f.name
            found.update(_schema_keys(type(default), path))
            # a group whose options have their own schemas (optim=adafactor): any option's keys are known
            for option in getattr(default, "OPTIONS", {}).values():
                found[path] += tuple(o.name for o in dataclasses.fields(option) if o.name not in found[path])
    return found


def _initials(name: str) -> str:
    return "".join(word[0] for word in name.split("_") if word)


def suggest(key: str, schema: type, groups: Iterable[str] = ()) -> str | None:
    """The schema key (dotted) or config group the unknown ``key`` most likely meant, or None.

    Siblings first (the same group's fields), by spelling (``max_stpes`` -> ``max_steps``) or as an
    abbreviation (``learning_rate`` -> ``lr``); then every key of the schema (``trian.max_steps``).
    """
    nodes = _schema_keys(schema)
    parent, _, leaf = key.rpartition(".")
    siblings = list(nodes.get(parent, ()))
    if not parent:
        siblings += [g for g in groups if g not in siblings]
    close = [s for s in siblings if s == _initials(leaf)]
    close += difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
    if close:
        return f"{parent}.{close[0]}" if parent else close[0]
    everything = [f"{p}.{n}" if p else n for p, names in nodes.items() for n in names]
    close = difflib.get_close_matches(key, everything, n=1, cutoff=0.75)
    return close[0] if close else None


def _fix(key: str, value: Any, guess: str | None, schema: type, groups: Iterable[str]) -> str:
    parent = key.rpartition(".")[0]
    if guess is None:
        known = _schema_keys(schema).get(parent)
        listed = f" (the keys of {parent}: {', '.join(known)})" if parent and known else ""
        return f"remove it{listed}"
    if isinstance(value, DictConfig):  # a misspelled group name before a dot: +trian.max_steps=3
        return f"write {guess} in place of {key}"
    shown = value if isinstance(value, (str, int, float, bool)) else "..."
    if guess in groups and "." not in key:
        plus = "+" if guess in APPENDED_GROUPS else ""
        return f"choose the config group with {plus}{guess}={shown}"
    return f"use {guess}={shown}"


def unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys of ``node`` (a composed config) that its schema dataclass does not have.

    Fields typed ``dict`` (``cluster.additional_parameters``) take any key; ``hydra`` is Hydra's own.
    """
    schema = OmegaConf.get_type(node)
    if not dataclasses.is_dataclass(schema):
        return []
    names = {f.name for f in dataclasses.fields(schema)}
    found = []
    for key in node:
        full = f"{prefix}{key}"
        if key not in names:
            if full != "hydra":
                found.append(full)
            continue
        child = node._get_node(key)  # the node itself: nothing is resolved while walking
        if isinstance(child, DictConfig) and not (child._is_none() or child._is_missing()):
            found += unknown_keys(child, f"{full}.")
    return found


def refuse(key: str, value: Any, schema: type, groups: Iterable[str] = ()) -> ConfigError:
    """The error for a key the schema does not know: the nearest key or group, and the fix."""
    groups = tuple(groups)
    guess = suggest(key, schema, groups)
    meant = f" Did you mean {guess}?" if guess else ""
    return ConfigError(
        f"{key}: is not a key of the config (nor a config group), so its value would be ignored.{meant} "
        f"Fix: {_fix(key, value, guess, schema, groups)}"
    )


def is_known(key: str, schema: type) -> bool:
    """Whether the dotted ``key`` names a field of ``schema`` (anything under a ``dict`` field is)."""
    nodes = _schema_keys(schema)
    parts = key.split(".")
    for depth in range(len(parts)):
        parent = ".".join(parts[:depth])
        if parent not in nodes:  # under a field that is not a dataclass: a dict or a list takes any key
            return True
        if parts[depth] not in nodes[parent]:
            return False
    return True


def check_known_keys(dcfg: DictConfig, groups: Iterable[str] = ()) -> None:
    """Refuse the first key the schema does not know, naming the nearest one; ``groups``: the config group
    names of ``conf/`` (a misspelled group added with ``+`` arrives here as a top-level key)."""
    schema = OmegaConf.get_type(dcfg)
    if schema is None or not dataclasses.is_dataclass(schema):
        return  # not composed on the schema: nothing to compare with
    for key in unknown_keys(dcfg):
        value = OmegaConf.select(dcfg, key, throw_on_missing=False, throw_on_resolution_failure=False)
        raise refuse(key, value, schema, groups)
