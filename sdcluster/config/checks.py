"""What every group's checks share: :class:`ConfigError`, the two helpers that raise it, the allowed values.

A check runs in the group's ``__post_init__`` (so when ``OmegaConf.to_object`` builds the objects, before any
job exists) and its message names the key, the problem and the fix, e.g.
``train.batch_size: must be > 0, got 0. Fix: per-device batch``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the key and how to fix it."""


def _require(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}. Fix: {fix}")


def _choice(value: str | None, key: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"got {value!r}", f"use one of {', '.join(map(str, choices))}")


TASKS = ("train", "generate", "train_generate", "cache")
"""``task``: train only, generate only, train and then generate from the run's exported model, or only
build the training data's latent cache (an array of ``data.cache_shards`` tasks) for training jobs to read."""

MIXED_PRECISION = ("no", "fp16", "bf16")
"""``train.mixed_precision`` and ``generate.mixed_precision``: float32, or a half-precision type on GPUs."""

PREDICTION_TYPES = ("epsilon", "v_prediction")
"""``train.prediction_type``: what the UNet learns to predict, the noise or the velocity."""

TRAIN_METHODS = {"full": None, "lora": "lora"}
"""``train.method`` -> the sub-block of ``train`` that holds its adapters' settings (None: it trains the
denoiser's own weights, no adapters): fine-tune every weight, or train low-rank adapters. The one place the
schema names methods; :data:`sdcluster.train.method.METHODS` implements each (a test keeps them in step)."""

TRACKERS = ("none", "tensorboard", "wandb")
"""``train.tracker``: where metrics go besides ``metrics.jsonl``, which is always written."""

LR_SCHEDULES = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
"""``optim.lr_schedule``: the names of ``diffusers.optimization.get_scheduler``."""

SCHEDULERS = ("ddim", "euler", "euler_a", "dpmpp", "pndm", "ddpm")
"""``generate.scheduler``: the samplers of :mod:`sdcluster.models.samplers`, which asserts it lists them."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _no_control(value: object, key: str) -> None:
    """A value that reaches the sbatch script must stay on its line: a newline would end an ``#SBATCH``
    line early and start a command (and sbatch silently ignores every ``#SBATCH`` line after a command)."""
    if isinstance(value, str) and (found := _CONTROL.search(value)):
        raise ConfigError(
            f"{key}: contains the control character {found.group()!r} (a newline or tab ends up as a line "
            "of the job script). Fix: remove it from the value"
        )


ROOTS = ("output_root", "jobs_root", "cache_root")


def check_root(value: str | None, key: str) -> None:
    """Refuse ``%`` in a root: SLURM expands ``%u``, ``%j``... in the ``#SBATCH --output`` path under
    ``jobs_root`` (submitit adds its own ``%j``), so the log folder it looks for is not the one created and
    the job dies with "No output/error stream produced"; in the other roots nothing expands it at all."""
    if not value or "%" not in value:
        return
    literal = value.replace("%u", "${oc.env:USER}") if "%u" in value else "/scratch/${oc.env:USER}/..."
    raise ConfigError(
        f"{key}: {value!r} contains '%': SLURM expands %u, %j... in the job's log paths, sdcluster nowhere, "
        f"so the folder would not be the one you meant. Fix: write the path literally, or let Hydra fill "
        f"it in: {key}='{literal}'"
    )


class Schema:
    """Base of every schema dataclass: a config pickled by an earlier sdcluster loads with the fields added
    since at their defaults. submitit pickles a job's callable, config included, when it is queued and
    unpickles it at each start: a job queued (or requeued) before an upgrade would otherwise stop with an
    ``AttributeError`` on the first new field it reads."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name in state:
                continue
            if f.default is not dataclasses.MISSING:
                state[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                state[f.name] = f.default_factory()
        self.__dict__.update(state)
