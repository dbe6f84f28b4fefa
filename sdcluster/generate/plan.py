"""What a generation makes: every image as an item with its own seed, found by its index, never listed.

The prompts come from :mod:`~sdcluster.generate.prompts` (plain prompts, or a program's templates);
every image is an item (prompt index, image index) whose seed is a hash of (``generate.seed``, prompt index,
image index). The seed, not the batch, decides the noise, so image k can be reproduced alone and the set of
images does not depend on the batch size or on how many shards make it. How items are cut into batches and
dealt to shards: :mod:`~sdcluster.generate.batches`.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdcluster import paths
from sdcluster.config import Config, GenerateConfig
from sdcluster.derive import derive_int
from sdcluster.generate.prompts import (
    Program,
    Sampling,
    load_program,
    prompt_at,
    sampling_of,
    template_prompts,
)
from sdcluster.generate.records import image_name
from sdcluster.identity import not_remade


@dataclass(frozen=True)
class Item:
    """One image to make: its prompt, seed, the template and slot values it came from, its settings."""

    prompt_index: int
    image_index: int
    prompt: str
    seed: int
    template_index: int
    labels: tuple[tuple[str, str], ...]
    sampling: Sampling

    @property
    def file(self) -> str:
        return image_name(self.prompt_index, self.image_index)

    @property
    def id(self) -> str:
        """``p0003-i0007``: the name ``generate.only`` takes."""
        return self.file.removesuffix(".png")


def item_seed(base_seed: int, prompt_index: int, image_index: int) -> int:
    """A 63-bit seed from sha256, identical on every machine and Python (``hash()`` is salted per process)."""
    return derive_int("sdcluster-item", base_seed, prompt_index, image_index, bits=63)


class Plan(Sequence[Item]):
    """Every image of a generation by its index, without holding them: an image is made when asked for.

    Templates in file order, each template's prompts in order, each prompt's images in order (prompt-major,
    as the plan has always been numbered): index -> (template, prompt, image) is arithmetic on the running
    totals of the templates, and a prompt's slot values are its number read as a mixed-radix numeral
    (:func:`~sdcluster.generate.prompts.labels_at`). Memory is per template, never per image, so a program
    of 10^12 images is counted, sharded and sampled as cheaply as one of ten.
    """

    def __init__(self, program: Program, gen: GenerateConfig) -> None:
        self.program, self.gen = program, gen
        self.prompts = [template_prompts(program, t) for t in range(len(program.templates))]
        self.images = [t.images or gen.num_images for t in program.templates]  # per prompt
        self.per_template = [p * i for p, i in zip(self.prompts, self.images, strict=True)]
        self.prompt_starts = list(itertools.accumulate(self.prompts, initial=0))
        self.item_starts = list(itertools.accumulate(self.per_template, initial=0))
        self.samplings = [sampling_of(t, gen) for t in program.templates]

    @property
    def total(self) -> int:
        """How many images (``len()`` too, while it fits a machine word)."""
        return self.item_starts[-1]

    @property
    def prompt_count(self) -> int:
        return self.prompt_starts[-1]

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, key: int | slice) -> Any:  # Item, or a list of Items for a slice
        if isinstance(key, slice):
            return [self.item_at(n) for n in range(self.total)[key]]
        return self.item_at(range(self.total)[key])  # range() checks the bounds and counts from the end

    def __iter__(self) -> Iterator[Item]:
        return self.items(0, self.total)

    def item_at(self, n: int) -> Item:
        return next(self.items(n, n + 1))

    def items(self, start: int, stop: int) -> Iterator[Item]:
        """Items ``start`` .. ``stop - 1``, each prompt made once for all of its images."""
        n = start
        while n < stop:
            t = bisect.bisect_right(self.item_starts, n) - 1
            number, image = divmod(n - self.item_starts[t], self.images[t])
            prompt = prompt_at(self.program, self.gen, t, number)
            p = self.prompt_starts[t] + number
            for i in range(image, min(self.images[t], image + stop - n)):
                seed = item_seed(self.gen.seed, p, i)
                yield Item(p, i, prompt.text, seed, t, prompt.labels, prompt.sampling)
            n += min(self.images[t], image + stop - n) - image

    def prompt_texts(self) -> Iterator[str]:
        """Every prompt's text in order, one at a time."""
        for t, count in enumerate(self.prompts):
            for number in range(count):
                yield prompt_at(self.program, self.gen, t, number).text

    def index_of(self, prompt_index: int, image_index: int) -> int | None:
        """The plan index of image (p, i), or None when the plan has no such image."""
        t = bisect.bisect_right(self.prompt_starts, prompt_index) - 1
        if not 0 <= t < len(self.prompts) or not 0 <= image_index < self.images[t]:
            return None
        return self.item_starts[t] + (prompt_index - self.prompt_starts[t]) * self.images[t] + image_index

    def count_keys(self, keys: np.ndarray) -> int:
        """How many of the distinct ``keys`` (:func:`~sdcluster.generate.manifest_index.file_key`) name an
        image of this plan: all are recorded when this equals :attr:`total` (no list of the plan's keys)."""
        keys = np.unique(keys)
        p, i = keys >> 32, keys & 0xFFFFFFFF
        starts = np.array(self.prompt_starts, dtype=np.int64)
        t = np.clip(np.searchsorted(starts, p, side="right") - 1, 0, len(self.prompts) - 1)
        images = np.array(self.images, dtype=np.int64)[t] if self.prompts else 0
        return int(((p < self.prompt_count) & (i < images)).sum())


def plan_items(cfg: Config) -> Plan:
    """Every (prompt index, image index) in prompt-major order, each with its own seed, made when asked."""
    return Plan(load_program(cfg.generate), cfg.generate)


def template_texts(cfg: Config) -> list[str]:
    """The text of every template, by template index (records name the template an image came from)."""
    return [t.text for t in load_program(cfg.generate).templates]


def _hydra_value(value: Any) -> str:
    """``value`` in Hydra's override grammar; strings quoted, quotes and ``${`` escaped."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, int | float):
        return repr(value)
    # Hydra unescapes backslashes only where they precede a quote (or end the string): double those.
    text, out = str(value), []
    for n, char in enumerate(text):
        if char == "\\":
            rest = text[n:].lstrip("\\")
            out.append("\\\\" if rest == "" or rest[0] == '"' else char)
        elif char == '"':
            out.append('\\"')
        else:
            out.append(char)
    return '"' + "".join(out).replace("${", "\\${") + '"'


def remake_command(cfg: Config, item: Item) -> str:
    """The command that makes this one image again, into a folder of its own (``generate.only``).

    Every generate key that differs from the schema's default is given, plus the resolved model (and LoRA),
    so the command does not depend on the run, the defaults or ``conf/local/``. The batch size is not in
    it (records do not depend on it): for the same bytes, run it with the batch size the image was made in
    (``jobs/<id>/config.yaml``); any other gives the same image up to batched-kernel rounding.
    """
    gen, default = dataclasses.asdict(cfg.generate), dataclasses.asdict(GenerateConfig())
    overrides, left_out = ["task=generate"], not_remade(cfg.generate)
    for key, value in gen.items():
        if key in left_out or value == default[key]:
            continue
        if isinstance(value, dict):  # a nested group: only its changed keys
            overrides += [
                f"generate.{key}.{sub}={_hydra_value(v)}"
                for sub, v in value.items()
                if v != default[key][sub]
            ]
        else:
            overrides.append(f"generate.{key}={_hydra_value(value)}")
    overrides.append(f"generate.model={_hydra_value(str(paths.generation_model(cfg)))}")
    lora = paths.generation_lora(cfg)
    if lora is not None:
        overrides.append(f"generate.lora={_hydra_value(str(lora))}")
    overrides.append(f"generate.only={item.id}")
    return " ".join(["python", "-m", "sdcluster.launch", *map(shlex.quote, overrides)])
