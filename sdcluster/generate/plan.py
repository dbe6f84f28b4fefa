"""What a generation makes: every image as an item with its own seed, and how items are dealt to shards.

Every image is an item (prompt index, image index) whose seed is a hash of (``generate.seed``, prompt index,
image index). The seed, not the batch, decides the noise, so image k can be reproduced alone and the set of
images does not depend on the batch size or on how many shards make it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from sdcluster.config import Config, ConfigError, GenerateConfig
from sdcluster.generate.records import image_name


@dataclass(frozen=True)
class Item:
    """One image to make."""

    prompt_index: int
    image_index: int
    prompt: str
    seed: int

    @property
    def file(self) -> str:
        return image_name(self.prompt_index, self.image_index)


def item_seed(base_seed: int, prompt_index: int, image_index: int) -> int:
    """A 63-bit seed from sha256, identical on every machine and Python (``hash()`` is salted per process)."""
    digest = hashlib.sha256(f"sdcluster-item:{base_seed}:{prompt_index}:{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def read_prompts(gen: GenerateConfig) -> list[str]:
    """``generate.prompts`` followed by the non-empty lines of ``generate.prompts_file``."""
    prompts = list(gen.prompts)
    if gen.prompts_file:
        path = Path(gen.prompts_file)
        if not path.is_file():
            raise ConfigError(f"generate.prompts_file: {path} does not exist. Fix: give a text file path")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts


def plan_items(cfg: Config) -> list[Item]:
    """Every (prompt index, image index) in prompt-major order, each with its own seed."""
    gen = cfg.generate
    return [
        Item(p, i, prompt, item_seed(gen.seed, p, i))
        for p, prompt in enumerate(read_prompts(gen))
        for i in range(gen.num_images)
    ]


def shard(items: list[Item], index: int, count: int, batch_size: int) -> list[list[Item]]:
    """This shard's batches: the global plan is cut into fixed batches first, then batches are dealt out.

    Dealing whole batches (not items) keeps every batch's composition independent of the shard count, so a
    K-shard run writes the same bytes as a 1-shard run (batched kernels round by batch shape).
    """
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside 0..{count - 1}")
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    return batches[index::count]
