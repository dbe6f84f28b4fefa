"""What a generation makes: every image as an item with its own seed, and how items are dealt to shards.

The prompts come from :mod:`~sdcluster.generate.prompts` (plain prompts, or a program's templates expanded);
every image is an item (prompt index, image index) whose seed is a hash of (``generate.seed``, prompt index,
image index). The seed, not the batch, decides the noise, so image k can be reproduced alone and the set of
images does not depend on the batch size or on how many shards make it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import shlex
from dataclasses import dataclass
from typing import Any

from sdcluster import paths
from sdcluster.config import Config, ConfigError, GenerateConfig
from sdcluster.generate.prompts import Sampling, expand, load_program
from sdcluster.generate.records import image_name


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
    digest = hashlib.sha256(f"sdcluster-item:{base_seed}:{prompt_index}:{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def plan_items(cfg: Config) -> list[Item]:
    """Every (prompt index, image index) in prompt-major order, each with its own seed."""
    gen = cfg.generate
    return [
        Item(
            p,
            i,
            prompt.text,
            item_seed(gen.seed, p, i),
            prompt.template_index,
            prompt.labels,
            prompt.sampling,
        )
        for p, prompt in enumerate(expand(load_program(gen), gen))
        for i in range(prompt.images)
    ]


def template_texts(cfg: Config) -> list[str]:
    """The text of every template, by template index (records name the template an image came from)."""
    return [t.text for t in load_program(cfg.generate).templates]


def cut_batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    """The plan's fixed batches: runs of items with the same settings, each cut into ``batch_size`` pieces.

    One pipeline call takes one negative prompt embedding per image but one guidance scale and step count,
    so a batch never mixes settings. The cut depends only on the plan and the batch size.
    """
    batches: list[list[Item]] = []
    for _, run in itertools.groupby(items, key=lambda item: item.sampling):
        group = list(run)
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return batches


def shard(items: list[Item], index: int, count: int, batch_size: int) -> list[list[Item]]:
    """This shard's batches: the global plan is cut into fixed batches first, then batches are dealt out.

    Dealing whole batches (not items) keeps every batch's composition independent of the shard count, so a
    K-shard run writes the same bytes as a 1-shard run (batched kernels round by batch shape).
    """
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside 0..{count - 1}")
    return cut_batches(items, batch_size)[index::count]


def batch_of(items: list[Item], image_id: str, batch_size: int) -> tuple[list[Item], Item]:
    """The batch ``image_id`` (``generate.only``) is rendered in, and the item itself.

    The whole batch is rendered, as in the full run, so the image comes out with the same bytes.
    """
    wanted = image_id.removesuffix(".png")
    for batch in cut_batches(items, batch_size):
        for item in batch:
            if item.id == wanted:
                return batch, item
    raise ConfigError(
        f"generate.only: {image_id} is not in this plan ({len(items)} images). Fix: use the image's remake "
        "command from its record, which carries the settings that planned it"
    )


# Not in a remake command: they do not change the image (the folder does not hash them either), or the
# command sets them itself (model, lora: resolved; only: the image).
_NOT_REMADE = (*GenerateConfig.NOT_IDENTITY, "model", "lora", "only")


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
    overrides = ["task=generate"]
    for key, value in gen.items():
        if key in _NOT_REMADE or value == default[key]:
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
