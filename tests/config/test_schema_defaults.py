"""The schema holds the defaults; a YAML file under ``conf/`` holds only what distinguishes its option.

Each composition is compared with the schema's defaults key by key: what differs must be exactly what the
chosen options and bundles set on purpose, listed here. And no YAML file restates a schema default (so
changing a default in the schema changes it everywhere, and the schema stays the one place to read it).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from sdcluster.config import Config
from tests.conftest import CONF

GROUPS = {f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)}


def flatten(tree: dict[str, Any]) -> dict[str, Any]:
    """``{"train.max_steps": 40, "task": ..., ...}``: one level of groups, values (lists, dicts) as leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if key in GROUPS and isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


SCHEMA = flatten(OmegaConf.to_container(OmegaConf.structured(Config)))  # MISSING reads "???" as in YAML


def composed(overrides: list[str]) -> dict[str, Any]:
    """The composition of ``conf/`` before interpolations are resolved, as launch composes it."""
    from hydra import compose, initialize_config_dir

    from sdcluster.config.store import register

    register()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return flatten(OmegaConf.to_container(compose(config_name="config", overrides=overrides)))


def differences(overrides: list[str]) -> dict[str, Any]:
    tree = composed(overrides)
    assert set(tree) == set(SCHEMA)
    return {key: value for key, value in tree.items() if value != SCHEMA[key]}


# What the default composition sets on purpose: data=sample is the shipped folder, with a few images held out.
SAMPLE = {"data.path": "${sdc_asset:sample_data}", "data.holdout": 2}
SLURM = {"cluster.name": "slurm", "cluster.timeout_min": 60}
SD15 = {
    "model.name": "sd15",
    "model.path": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "model.native_resolution": 512,
}
OWN_DATA = {"data.name": "imagefolder", "data.path": "/tmp"}
DEBUG = {
    "train.max_steps": 4,
    "train.log_every": 1,
    "train.checkpoint_every": 2,
    "generate.num_images": 1,
    "generate.steps": 2,
}
JEANS_SD14 = {
    "model.name": "sd14",
    "model.path": "CompVis/stable-diffusion-v1-4",
    "model.native_resolution": 512,
    "train.resolution": 512,
    "train.center_crop": True,
    "train.batch_size": 1,
    "train.grad_accum": 4,
    "train.gradient_checkpointing": True,
    "train.use_ema": True,
    "train.max_steps": 15000,
    "train.mixed_precision": "fp16",
    "train.checkpoint_every": 500,
    "train.log_every": 50,
    "optim.lr": 1e-5,
    "generate.num_images": 8,
    "generate.batch_size": 8,
    "generate.steps": 50,
    "generate.height": 512,
    "generate.width": 512,
    "generate.mixed_precision": "fp16",
}


@pytest.mark.parametrize(
    ("overrides", "on_purpose"),
    [
        ([], SAMPLE),
        (["+cluster=slurm"], {**SAMPLE, **SLURM}),
        (["+cluster=local"], SAMPLE),
        (["experiment=jeans_sd14", "data=imagefolder", "data.path=/tmp"], {**JEANS_SD14, **OWN_DATA}),
        (["debug=fast"], {**SAMPLE, **DEBUG}),
        (["model=sd15"], {**SAMPLE, **SD15}),
        (["data=imagefolder", "data.path=/tmp"], OWN_DATA),
    ],
)
def test_a_composition_is_the_schema_defaults_plus_what_its_options_set(overrides, on_purpose):
    assert differences(overrides) == on_purpose


def test_the_typed_default_run_is_the_schema_defaults_plus_the_sample_data(tmp_path):
    """The same through the typed path jobs get (``compose`` builds the dataclasses and absolutizes paths)."""
    from tests.conftest import compose

    roots = [f"output_root={tmp_path}/o", f"jobs_root={tmp_path}/j", f"cache_root={tmp_path}/c"]
    cfg = compose(roots)
    expected = Config(output_root=f"{tmp_path}/o", jobs_root=f"{tmp_path}/j", cache_root=f"{tmp_path}/c")
    expected.data.path, expected.data.holdout = cfg.data.path, 2
    assert Path(cfg.data.path).is_dir()
    assert dataclasses.asdict(cfg) == dataclasses.asdict(expected)


# A YAML key equal to the schema's default: allowed only where it names the option (its ``name:``).
RESTATED_ON_PURPOSE = {
    ("cluster/local.yaml", "cluster.name"),
    ("data/sample.yaml", "data.name"),
    ("model/tiny.yaml", "model.name"),
    ("optim/adamw.yaml", "optim.name"),
}
SKIPPED_KEYS = {"defaults", "hydra"}  # Hydra's own: the defaults list and its settings
SITE = CONF / "local"  # gitignored site settings (conf/local/<group>.yaml) may say what they like


def yaml_files() -> list[Path]:
    return sorted(p for p in CONF.rglob("*.yaml") if SITE not in p.parents)


def yaml_keys(path: Path) -> dict[str, Any]:
    """The file's keys as full config keys: its package (``# @package``, else its group folder) prefixed."""
    header = re.search(r"^# @package (\S+)", path.read_text(), re.MULTILINE)
    group = ".".join(path.relative_to(CONF).parent.parts)
    package = header.group(1) if header else group
    package = "" if package == "_global_" else package
    tree = OmegaConf.to_container(OmegaConf.load(path)) or {}
    tree = {k: v for k, v in tree.items() if k not in SKIPPED_KEYS}
    return flatten({package: tree} if package else tree)


def same(value: Any, default: Any) -> bool:
    """Equal as config values: ``0`` restates ``0.0``, but ``1`` does not restate ``true``."""
    return value == default and isinstance(value, bool) == isinstance(default, bool)


def test_the_yaml_files_are_found():
    names = {str(p.relative_to(CONF)) for p in yaml_files()}
    assert {"config.yaml", "train/default.yaml", "cluster/slurm.yaml", "experiment/jeans_sd14.yaml"} <= names


def test_yaml_holds_choices_not_restated_defaults():
    restated, unknown = [], []
    for path in yaml_files():
        name = str(path.relative_to(CONF))
        for key, value in yaml_keys(path).items():
            if key not in SCHEMA:
                unknown.append(f"conf/{name}: {key}")
            elif same(value, SCHEMA[key]) and (name, key) not in RESTATED_ON_PURPOSE:
                restated.append(f"conf/{name}: {key}: {value!r}")
    assert not unknown, "keys that are not in the schema:\n  " + "\n  ".join(unknown)
    assert not restated, (
        "YAML restates the schema's default (delete the line; the default and its meaning live in "
        "sdcluster/config/):\n  " + "\n  ".join(restated)
    )


@pytest.mark.parametrize(("name", "key"), sorted(RESTATED_ON_PURPOSE))
def test_each_allowed_restatement_is_still_one(name, key):
    """The exception list stays current: each entry is a key its file sets, equal to the default."""
    assert same(yaml_keys(CONF / name).get(key, object()), SCHEMA[key])
