"""Samplers: ``generate.scheduler`` names -> the diffusers noise-scheduler class that samples with it.

In diffusers a sampling algorithm is a noise-scheduler class; here "sampler" names the choice a user makes
for generation (and validation images), "noise scheduler" the object a model carries (its betas and
prediction type), "LR schedule" the optimizer's, and "scheduler" only the cluster's. A sampler is built from
the loaded pipeline's own noise-scheduler config (``Cls.from_config``), so the betas, the timestep spacing
and the prediction type the model was trained with carry over; only the sampling algorithm changes. Class
names are strings resolved on use, so importing this module (e.g. on the login node to list the choices)
does not import diffusers.
"""

from __future__ import annotations

from typing import Any

from sdcluster.config import SCHEDULERS, ConfigError

# name -> (diffusers class name, keyword overrides passed to from_config)
SAMPLER_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    # PLMS only, as every Stable Diffusion scheduler config says: a config without the key (SDXL's Euler one)
    # would get PNDM's Runge-Kutta warm-up, which fails for few steps and is not what SD pipelines use
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "ddpm": ("DDPMScheduler", {}),
}
# config.SCHEDULERS is named after the key it checks (generate.scheduler), which users type and stays
assert tuple(SAMPLER_CLASSES) == SCHEDULERS, "config.SCHEDULERS must list the names of SAMPLER_CLASSES"


def make_sampler(name: str, config: Any) -> Any:
    """A new noise scheduler that samples as ``name``, configured like ``config`` (a pipeline's
    ``scheduler.config``: its betas and prediction type)."""
    if name not in SAMPLER_CLASSES:
        raise ConfigError(
            f"generate.scheduler: unknown sampler {name!r}. Fix: use one of {', '.join(SAMPLER_CLASSES)}"
        )
    import diffusers

    class_name, overrides = SAMPLER_CLASSES[name]
    return getattr(diffusers, class_name).from_config(config, **overrides)


def set_sampler(pipe: Any, name: str) -> None:
    """Make ``pipe`` sample as ``name``: its noise scheduler (``pipe.scheduler``, diffusers' attribute) is
    replaced by the sampler's, configured like the one it had."""
    from sdcluster.models.family import family_of_pipeline

    pipe.scheduler = family_of_pipeline(pipe).sampler(name, pipe.scheduler.config)  # the family's samplers
