"""The ``model`` group (``conf/model/``): which Stable Diffusion to start from."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sdcluster.config.checks import Schema, _choice, _require
from sdcluster.model_source import EMBEDDED  # re-exported: the schema names the embedded models

__all__ = ["EMBEDDED", "FlowConfig", "ModelConfig"]

_COMMIT = re.compile(r"^[0-9a-f]{40}$")

TIMESTEP_SAMPLING = ("logit_normal", "mode", "none")
"""``model.flow_matching.timestep_sampling``: the density of diffusers'
``compute_density_for_timestep_sampling`` (``none``: uniform)."""
FLOW_LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")
"""``model.flow_matching.loss_weighting``: the weights of diffusers' ``compute_loss_weighting_for_sd3``."""


@dataclass
class FlowConfig(Schema):
    """The flow-matching objective of a rectified-flow model (Stable Diffusion 3.x, FLUX.1): how training
    timesteps are drawn and how the loss is weighted, as in diffusers' SD3 and FLUX training examples (their
    ``--weighting_scheme``, ``--logit_mean``, ``--logit_std``, ``--mode_scale``, and FLUX's
    ``--guidance_scale``). The schedule's shift is the model's own (its scheduler config). Ignored by the
    DDPM families (SD 1.x/2.x, SDXL)."""

    timestep_sampling: str = "logit_normal"
    """How each example's noise level is drawn: ``logit_normal`` (the sigmoid of a normal draw, SD3's
    choice), ``mode`` (mode sampling with ``mode_scale``), ``none`` (uniform)."""
    logit_mean: float = 0.0
    """Mean of the normal draw of ``logit_normal``."""
    logit_std: float = 1.0
    """Standard deviation of the normal draw of ``logit_normal``."""
    mode_scale: float = 1.29
    """Scale of ``mode`` sampling (1.29 is the SD3 paper's value)."""
    loss_weighting: str = "none"
    """Per-example loss weights: ``none``, ``sigma_sqrt`` (1 / sigma^2) or ``cosmap``."""
    guidance_scale: float = 3.5
    """The guidance value a transformer with a guidance embedding (FLUX.1-dev, guidance-distilled) is
    trained with, as diffusers' FLUX training example's ``--guidance_scale``; unused by models without one
    (FLUX.1-schnell, SD 3.x)."""

    def __post_init__(self) -> None:
        _choice(self.timestep_sampling, "model.flow_matching.timestep_sampling", TIMESTEP_SAMPLING)
        _choice(self.loss_weighting, "model.flow_matching.loss_weighting", FLOW_LOSS_WEIGHTING)
        _require(
            self.logit_std > 0,
            "model.flow_matching.logit_std",
            f"must be > 0, got {self.logit_std}",
            "e.g. 1.0",
        )
        _require(
            self.guidance_scale >= 0,
            "model.flow_matching.guidance_scale",
            f"must be >= 0, got {self.guidance_scale}",
            "e.g. 3.5, FLUX.1-dev's",
        )


@dataclass
class ModelConfig(Schema):
    """Which Stable Diffusion to start from.

    ``path`` is a local diffusers folder or a hub id; the special values ``tiny``, ``tiny_sdxl``,
    ``tiny_sd3`` and ``tiny_flux`` build the embedded random-weight Stable Diffusion, SDXL, SD3 and FLUX
    offline (tests and the default run), so no code path knows which one it got. The family (SD 1.x/2.x,
    SDXL, SD 3.x or FLUX.1) is read from the model's ``model_index.json``.
    """

    name: str = "tiny"
    """Short name of the model; names the run folder (``outputs/runs/<name>-<hash>``) unless run_name does."""
    path: str = "tiny"
    """A local diffusers folder or a hub id to fine-tune; ``tiny`` / ``tiny_sdxl`` / ``tiny_sd3`` /
    ``tiny_flux``: the random-weight Stable Diffusion / SDXL / SD3 / FLUX built offline."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin the weights to, for a reproducible run; null: main."""
    variant: str | None = None
    """Weight files variant, e.g. ``fp16`` (half the download); null: the full-precision files."""
    native_resolution: int | None = 64
    """The image size in pixels the model was trained at (SD 1.x and 2.1-base: 512, SDXL: 1024; the tiny
    models: 64); ``train.resolution`` must equal it, since a model fine-tuned at another size relearns its
    details, badly. Each ``conf/model/`` option sets its own; give it with ``model.path`` of another size;
    null: no check (a model of unknown size, or another size on purpose)."""
    cache_dir: str | None = None
    """Where launch stages a hub model and jobs read it (put it on storage every node sees); null: Hugging
    Face's cache (``HF_HUB_CACHE``, ``~/.cache/huggingface/hub``)."""
    vae_path: str | None = None
    """An ``AutoencoderKL`` to use instead of the model's VAE, in training, the export and generation: a
    local folder (``config.json`` + safetensors) or a hub id, staged at launch like the model. For SDXL, a VAE
    fine-tuned for half precision (``madebyollin/sdxl-vae-fp16-fix``) lets the VAE follow
    ``train.mixed_precision``; without one SDXL's VAE stays in fp32 (it overflows in fp16). null: the model's
    own VAE."""
    vae_commit: str | None = None
    """The hub commit a hub ``vae_path`` is pinned to; launch fills it in (from ``main``). Part of the run's
    identity."""
    commit: str | None = None
    """The hub commit (40 hex digits) the weights are pinned to. Launch fills it in from ``revision``;
    set it to pin a run to a commit you know. Part of the run's identity in place of ``revision``."""
    flow_matching: FlowConfig = field(default_factory=FlowConfig)
    """The flow-matching objective's settings (Stable Diffusion 3.x); part of the run's identity when
    changed from the defaults."""

    def __post_init__(self) -> None:
        _require(bool(self.path), "model.path", "is empty", "give a local diffusers folder or a hub id")
        _require(
            self.commit is None or bool(_COMMIT.match(self.commit)),
            "model.commit",
            f"{self.commit!r} is not a full commit sha (40 lowercase hex digits)",
            "copy the full sha, or drop model.commit and give model.revision",
        )
        _require(
            self.vae_commit is None or bool(_COMMIT.match(self.vae_commit)),
            "model.vae_commit",
            f"{self.vae_commit!r} is not a full commit sha (40 lowercase hex digits)",
            "copy the full sha, or drop model.vae_commit (launch pins the VAE's main)",
        )
        _require(
            self.native_resolution is None or self.native_resolution > 0,
            "model.native_resolution",
            f"must be > 0, got {self.native_resolution}",
            "the model's training size in pixels, e.g. 512, or null for no check",
        )
