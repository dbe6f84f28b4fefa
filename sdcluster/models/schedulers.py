"""``generate.scheduler`` names -> diffusers noise schedulers.

A scheduler is rebuilt from the loaded pipeline's own scheduler config (``Cls.from_config``), so the betas,
the timestep spacing and the prediction type the model was trained with carry over; only the sampling
algorithm changes. Class names are strings resolved on use, so importing this module (e.g. on the login node
to list the choices) does not import diffusers.
"""

from __future__ import annotations

from typing import Any

from sdcluster.config import SCHEDULERS, ConfigError

# name -> (diffusers class name, keyword overrides passed to from_config)
SCHEDULER_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    # PLMS only, as every Stable Diffusion scheduler config says: a config without the key (SDXL's Euler one)
    # would get PNDM's Runge-Kutta warm-up, which fails for few steps and is not what SD pipelines use
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "ddpm": ("DDPMScheduler", {}),
}
assert tuple(SCHEDULER_CLASSES) == SCHEDULERS, "config.SCHEDULERS must list the names of SCHEDULER_CLASSES"


def make_scheduler(name: str, config: Any) -> Any:
    """A new scheduler of kind ``name``, configured like ``config`` (a pipeline's ``scheduler.config``)."""
    if name not in SCHEDULER_CLASSES:
        raise ConfigError(
            f"generate.scheduler: unknown scheduler {name!r}. Fix: use one of {', '.join(SCHEDULER_CLASSES)}"
        )
    import diffusers

    class_name, overrides = SCHEDULER_CLASSES[name]
    return getattr(diffusers, class_name).from_config(config, **overrides)


def set_scheduler(pipe: Any, name: str) -> None:
    """Replace ``pipe.scheduler`` by the scheduler called ``name``."""
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
