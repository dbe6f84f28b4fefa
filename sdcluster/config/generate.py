"""The ``generate`` group (``conf/generate/``): images from the fine-tuned (or any) pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field

from sdcluster.config.checks import MIXED_PRECISION, SCHEDULERS, _choice, _require
from sdcluster.config.data import SAMPLE_PROMPTS


@dataclass
class GenerateConfig:
    """Batched generation: P prompts x ``num_images`` each, in batches of ``batch_size``."""

    prompts: list[str] = field(default_factory=lambda: list(SAMPLE_PROMPTS))
    """Prompts to render, each num_images times; the defaults describe the shipped sample data."""
    prompts_file: str | None = None
    """A text file of prompts, one a line, added after ``prompts``; for long lists."""
    negative_prompt: str | None = None
    """What the images should not show (guidance steers away from it); null: none."""
    num_images: int = 2
    """Images per prompt; each image's seed comes from (seed, prompt index, image index)."""
    batch_size: int = 4
    """Images per pipeline call: changes speed and memory, not the images (nor their folder)."""
    steps: int = 20
    """Denoising steps per image: more is slower and usually cleaner."""
    guidance_scale: float = 7.5
    """Classifier-free guidance: higher follows the prompt more closely; 1 or less turns it off."""
    height: int | None = None
    """Image height in pixels, a multiple of 8; null: the model's default size."""
    width: int | None = None
    """Image width in pixels, a multiple of 8; null: the model's default size."""
    scheduler: str = "ddim"
    """The sampler (also of the validation images): same weights, different speed and look."""
    seed: int = 0
    """Base seed of every image's own seed, so an image can be reproduced alone."""
    model: str | None = None
    """A diffusers pipeline folder to generate from; null: this run's exported fine-tuned model."""
    mixed_precision: str = "no"
    """Generate in fp16 or bf16 on a GPU (ignored on CPU); no: float32."""
    shards: int = 1
    """Split the images over this many jobs (a job array); the files are the same for any count."""

    def __post_init__(self) -> None:
        _require(self.num_images > 0, "generate.num_images", "must be > 0", "images per prompt, e.g. 8")
        _require(self.batch_size > 0, "generate.batch_size", "must be > 0", "e.g. 8")
        _require(self.steps > 0, "generate.steps", "must be > 0", "e.g. 30")
        _require(self.guidance_scale >= 0, "generate.guidance_scale", "must be >= 0", "e.g. 7.5")
        for key in ("height", "width"):
            value = getattr(self, key)
            _require(
                value is None or (value > 0 and value % 8 == 0),
                f"generate.{key}",
                f"must be a positive multiple of 8, got {value}",
                "e.g. 512, or null for the model's default",
            )
        _choice(self.scheduler, "generate.scheduler", SCHEDULERS)
        _choice(self.mixed_precision, "generate.mixed_precision", MIXED_PRECISION)
        _require(self.shards > 0, "generate.shards", "must be > 0", "use 1 for a single job")
