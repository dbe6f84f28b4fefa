"""How many images a generation makes, counted on the login node before anything is queued, and its bound.

A count is arithmetic on the program (each template's prompts x images per prompt; the prompts are the
product of its slots' sizes, or its ``count``), never an expansion: a program of 10^12 images is counted as
fast as one of ten. The launch prints the counts (per template, per shard, in total) and refuses a plan
above ``generate.max_images``, or one whose image names the manifest cannot number.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdcluster.config import ConfigError, GenerateConfig
from sdcluster.generate.batches import Batches
from sdcluster.generate.plan import Plan
from sdcluster.generate.prompts import load_program

MAX_PROMPTS = 2**31
"""Image names number prompts in an int64 key, ``(prompt << 32) | image`` (manifest_index.file_key)."""
MAX_IMAGES_PER_PROMPT = 2**32
SHOWN_TEMPLATES = 20  # the dry run lists this many templates, then sums up the rest
SHOWN_SHARDS = 16


@dataclass(frozen=True)
class TemplateCount:
    index: int
    text: str
    prompts: int
    images: int  # per prompt

    @property
    def total(self) -> int:
        return self.prompts * self.images


@dataclass(frozen=True)
class PlanCount:
    """A plan's images: in total, per template (file order) and per shard (``generate.shards``)."""

    total: int
    templates: list[TemplateCount]
    shards: list[int]


def count_plan(gen: GenerateConfig) -> PlanCount:
    """Count the images of ``gen``'s plan without making any of them."""
    plan = Plan(load_program(gen), gen)
    templates = [
        TemplateCount(n, t.text, plan.prompts[n], plan.images[n])
        for n, t in enumerate(plan.program.templates)
    ]
    batches = Batches(plan, gen.batch_size)
    shards = [batches.image_count(batches.dealt(k, gen.shards)) for k in range(gen.shards)]
    return PlanCount(plan.total, templates, shards)


def _short(text: str, width: int = 60) -> str:
    return repr(text if len(text) <= width else text[: width - 3] + "...")


def check_plan_size(gen: GenerateConfig) -> PlanCount:
    """Refuse, before anything is queued, a plan above ``generate.max_images`` or beyond what image names
    can number; a remake (``generate.only``) makes one image, so only the names are checked for it."""
    count = count_plan(gen)
    if gen.only is None and count.total > gen.max_images:
        top = max(count.templates, key=lambda t: t.total)
        raise ConfigError(
            f"generate.max_images: this launch would make {count.total:,} images, more than the limit of "
            f"{gen.max_images:,}; template {top.index} ({_short(top.text)}) makes the most: {top.total:,} "
            f"({top.prompts:,} prompts x {top.images:,} images). Fix: raise generate.max_images (e.g. "
            f"generate.max_images={count.total}) if you mean it, lower that template's count or images (or "
            "generate.num_images), or split the program into several launches"
        )
    prompts = sum(t.prompts for t in count.templates)
    if prompts > MAX_PROMPTS or any(t.images > MAX_IMAGES_PER_PROMPT for t in count.templates):
        raise ConfigError(
            f"generate: the plan has {prompts:,} prompts of up to {max(t.images for t in count.templates):,} "
            f"images each; image names (p<prompt>-i<image>) number at most {MAX_PROMPTS:,} prompts of "
            f"{MAX_IMAGES_PER_PROMPT:,} images. Fix: lower count, images or the slots' values, or split the "
            "program into several launches"
        )
    return count


def describe_counts(gen: GenerateConfig) -> list[str]:
    """The lines the dry run and the launch summary print: images in total, per template, per shard."""
    count = count_plan(gen)
    if gen.only:
        return [f"images made:  1 (generate.only={gen.only}, of a plan of {count.total:,})"]
    lines = [f"images made:  {count.total:,} in total (generate.max_images={gen.max_images:,})"]
    for t in count.templates[:SHOWN_TEMPLATES]:
        each = f"{t.prompts:,} prompts x {t.images:,} images"
        lines.append(f"  template {t.index}: {t.total:,} = {each}  {_short(t.text)}")
    rest = count.templates[SHOWN_TEMPLATES:]
    if rest:
        lines.append(f"  ... {len(rest):,} more templates: {sum(t.total for t in rest):,} images")
    if len(count.shards) <= SHOWN_SHARDS:
        shards = ", ".join(f"{n:,}" for n in count.shards)
    else:
        shards = f"{min(count.shards):,} to {max(count.shards):,} each"
    lines.append(f"  per shard:  {shards} (generate.shards={gen.shards})")
    return lines
