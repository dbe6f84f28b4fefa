"""Single-file checkpoints as generation reads them: one ``.safetensors`` in the original Stable Diffusion
layout (what ComfyUI and A1111 share, and what ``train.export_formats=[diffusers,single_file]`` writes).

Loaded with the pipeline's own ``from_single_file``. The file holds weights only: the architecture, the
tokenizers and the scheduler come from a diffusers folder of the same family (``generate.model_config``, else
the base model ``model.path``), read offline, so a job never asks the hub for a config. Pickled ``.ckpt``
files are refused like every other pickle: loading one can run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdcluster.config import ConfigError

if TYPE_CHECKING:
    from sdcluster.config import Config
    from sdcluster.models.family import Family

CHECKPOINT_SUFFIX = ".safetensors"
"""The only single-file format loaded (and written: ``<run folder name>.safetensors`` in ``model/``)."""

TEXT_PREFIXES: dict[str, tuple[str, ...]] = {
    "StableDiffusionPipeline": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model."),
    "StableDiffusionXLPipeline": (
        "model.diffusion_model.",
        "first_stage_model.",
        "conditioner.embedders.0.",
        "conditioner.embedders.1.",
    ),
}
"""Pipeline class -> the key prefixes every single file of that family has (UNet, VAE, each text encoder):
what tells an SDXL file from an SD 1.x/2.x one before ``from_single_file`` fails on a shape."""


def check_single_file(path: Path, key: str = "generate.model") -> None:
    """A single-file ``path`` is an existing ``.safetensors`` file (never a pickle)."""
    if path.suffix.lower() != CHECKPOINT_SUFFIX:
        raise ConfigError(
            f"{key}: {path} is a pickled checkpoint ({path.suffix}); pickles are never loaded (loading one "
            "can run code). Fix: use the model's .safetensors file, or convert it once where you trust it"
        )
    if not path.is_file():
        raise ConfigError(f"{key}: no file at {path}. Fix: check the path of the .safetensors checkpoint")


def config_source(cfg: Config) -> str:
    """The diffusers folder whose configs, tokenizers and scheduler describe a single-file ``generate.model``:
    ``generate.model_config``, else the base model (staged at launch when it is a hub model)."""
    if cfg.generate.model_config:
        return str(Path(cfg.generate.model_config).expanduser())
    from sdcluster.models.lora import base_source

    return base_source(cfg)[0]


def check_family(path: Path, family: Family, source: str) -> None:
    """The file's keys are those of ``family`` (read from the header only), or the fix is named."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        keys = list(fh.keys())
    missing = [p for p in TEXT_PREFIXES[family.pipeline_name] if not any(k.startswith(p) for k in keys)]
    if missing:
        found = [
            name
            for name, prefixes in TEXT_PREFIXES.items()
            if all(any(k.startswith(p) for k in keys) for p in prefixes)
        ]
        what = f"a {found[0]} checkpoint" if found else "not a Stable Diffusion 1.x/2.x or SDXL checkpoint"
        raise ConfigError(
            f"generate.model: {path} is {what} (no {', '.join(missing)} keys), but its config {source} is a "
            f"{family.pipeline_name}. Fix: set generate.model_config to a pipeline folder of the file's "
            "family (or model= that family, e.g. model=sdxl)"
        )


def load_single_file(cfg: Config, path: Path, dtype: Any, dtype_keyword: str) -> tuple[Any, Family]:
    """The pipeline of the single file ``path`` (its family's class, ``from_single_file``, offline), and
    that family."""
    from sdcluster.models.family import family_of

    check_single_file(path)
    source = config_source(cfg)
    family = family_of(source)
    check_family(path, family, source)
    pipe = family.pipeline_class.from_single_file(
        str(path), config=source, local_files_only=True, **{dtype_keyword: dtype}, **family.pipeline_kwargs()
    )
    return pipe, family
