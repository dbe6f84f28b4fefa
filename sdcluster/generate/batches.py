"""The plan's fixed batches and how shards take them, by arithmetic on the plan's index ranges.

The plan is cut into runs of images with the same pipeline settings (one pipeline call takes one guidance
scale and step count), each run into pieces of ``batch_size``; shard k of K takes batches k, k + K, ...
Dealing whole batches (not items) keeps every batch's composition independent of the shard count, so a
K-shard run writes the same bytes as a 1-shard run (batched kernels round by batch shape). Runs are found
per template, so a shard's batches, their count and its number of images are known without listing them.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sdcluster.config import ConfigError
from sdcluster.generate.manifest_index import image_name

if TYPE_CHECKING:
    from sdcluster.generate.plan import Item, Plan


def _runs(plan: Plan) -> list[tuple[int, int]]:
    """(first, end) plan indexes of each run of consecutive templates with the same settings."""
    runs: list[tuple[int, int]] = []
    for t, sampling in enumerate(plan.samplings):
        start, stop = plan.item_starts[t], plan.item_starts[t + 1]
        if runs and plan.samplings[t - 1] == sampling:
            runs[-1] = (runs[-1][0], stop)
        elif stop > start:
            runs.append((start, stop))
    return runs


class Batches(Sequence[list["Item"]]):
    """Batches number ``index``, ``index + count``, ... of the plan's fixed batches (``0, 1``: all of them);
    each is made (as a list of items) only when asked for."""

    def __init__(self, plan: Plan, batch_size: int, index: int = 0, count: int = 1) -> None:
        self.plan, self.size = plan, batch_size
        self.runs = _runs(plan)
        self.run_starts = [start for start, _ in self.runs]
        sizes = (-(-(stop - start) // batch_size) for start, stop in self.runs)
        self.run_batches = list(itertools.accumulate(sizes, initial=0))  # first batch number of each run
        self.numbers = self.dealt(index, count)

    def dealt(self, index: int, count: int) -> range:
        """The global numbers of shard ``index``'s batches out of ``count`` shards."""
        return range(index, self.run_batches[-1], count)

    def __len__(self) -> int:
        return len(self.numbers)

    def __getitem__(self, key: int | slice) -> Any:  # a batch, or a list of batches for a slice
        if isinstance(key, slice):
            return [self[k] for k in range(len(self))[key]]
        return list(self.plan.items(*self.bounds(self.numbers[key])))

    def bounds(self, number: int) -> tuple[int, int]:
        """(first, end) plan indexes of global batch ``number``."""
        r = bisect.bisect_right(self.run_batches, number) - 1
        first = self.run_starts[r] + (number - self.run_batches[r]) * self.size
        return first, min(first + self.size, self.runs[r][1])

    def number_of(self, n: int) -> int:
        """The global number of the batch holding plan index ``n``."""
        r = bisect.bisect_right(self.run_starts, n) - 1
        return self.run_batches[r] + (n - self.run_starts[r]) // self.size

    def image_count(self, numbers: range | None = None) -> int:
        """How many images these batches (or batches ``numbers``) hold, counted per run: every batch is full
        but a run's last."""
        total, numbers = 0, self.numbers if numbers is None else numbers
        for r, (start, stop) in enumerate(self.runs):
            low, high = self.run_batches[r], self.run_batches[r + 1]
            first = numbers.start + max(0, -(-(low - numbers.start) // numbers.step)) * numbers.step
            taken = range(first, high, numbers.step)
            total += len(taken) * self.size
            if taken and taken[-1] == high - 1:  # the run's last batch, short by what the run lacks
                total -= (high - low) * self.size - (stop - start)
        return total


def cut_batches(items: Plan, batch_size: int) -> Batches:
    """The plan's fixed batches: runs of items with the same settings, each cut into ``batch_size`` pieces.

    The cut depends only on the plan and the batch size.
    """
    return Batches(items, batch_size)


def shard(items: Plan, index: int, count: int, batch_size: int) -> Batches:
    """This shard's batches: the global plan is cut into fixed batches first, then batches are dealt out."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside 0..{count - 1}")
    return Batches(items, batch_size, index, count)


def batch_of(items: Plan, image_id: str, batch_size: int) -> tuple[list[Item], Item]:
    """The batch ``image_id`` (``generate.only``) is rendered in, and the item itself.

    The whole batch is rendered, as in the full run, so the image comes out with the same bytes.
    """
    wanted = image_id.removesuffix(".png")
    p, i = (int(part[1:]) for part in wanted.split("-"))
    n = items.index_of(p, i) if image_name(p, i) == f"{wanted}.png" else None
    if n is None:
        raise ConfigError(
            f"generate.only: {image_id} is not in this plan ({items.total} images). Fix: use the image's "
            "remake command from its record, which carries the settings that planned it"
        )
    batches = Batches(items, batch_size)
    first, end = batches.bounds(batches.number_of(n))
    batch = list(items.items(first, end))
    return batch, batch[n - first]
