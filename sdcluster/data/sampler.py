"""Which example each rank reads at each micro-step, as a pure function of the step counter.

The global sample stream is the concatenation of per-epoch permutations; micro-step ``s`` covers global
positions ``[s*B*W, (s+1)*B*W)`` and rank ``r`` takes its ``B`` consecutive slots in that window. Because a
sample's position, index and augmentation seed depend only on ``(seed, s, rank)``, resuming needs nothing but
the micro-step counter the checkpoint already has: no sampler state, no skipping through a DataLoader (the
diffusers script dropped its skip logic and replays the whole epoch instead).

Epochs straddle micro-steps when ``B*W`` does not divide the dataset size; that is deliberate, so every
example is seen equally often and no partial batch is ever dropped or padded.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from sdcluster.derive import derive_int

_EPOCH_SEED_STRIDE = 1_000_003  # a prime, so (seed, epoch) pairs do not collide for realistic values
_SEED_MASK = (1 << 63) - 1


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> torch.Tensor:
    """The order of the dataset in one epoch: identical in every process, on every machine."""
    generator = torch.Generator().manual_seed(seed * _EPOCH_SEED_STRIDE + epoch)
    return torch.randperm(num_examples, generator=generator)


def aug_seed_of(seed: int, position: int) -> int:
    """A 63-bit augmentation seed for one global position: every pass over an image gets a fresh crop."""
    # the low 63 bits (a mask, where the other derivations keep the top ones): what it has always been
    return derive_int(seed, position, algorithm="blake2b") & _SEED_MASK


def position_to_epoch(position: int, num_examples: int) -> int:
    """The epoch a global stream position belongs to."""
    return position // num_examples


class StepSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """An endless stream of ``(index, aug_seed)`` keys for one rank, starting at ``start_micro_step``.

    Use it with ``DataLoader(TrainImages(...), batch_size=per_rank_batch, sampler=..., collate_fn=collate)``
    and pull exactly one batch per micro-step; the loop decides when to stop.
    """

    def __init__(
        self,
        num_examples: int,
        per_rank_batch: int,
        world_size: int,
        rank: int,
        seed: int,
        start_micro_step: int = 0,
    ) -> None:
        if num_examples <= 0:
            raise ValueError(f"num_examples must be > 0, got {num_examples}: the dataset is empty")
        if per_rank_batch <= 0 or world_size <= 0:
            raise ValueError(f"per_rank_batch and world_size must be > 0, got {per_rank_batch}, {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if start_micro_step < 0:
            raise ValueError(f"start_micro_step must be >= 0, got {start_micro_step}")
        super().__init__()
        self.num_examples = num_examples
        self.per_rank_batch = per_rank_batch
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.start_micro_step = start_micro_step
        self._cached: tuple[int, list[int]] | None = None  # only the current epoch: the stream is endless

    @property
    def global_batch(self) -> int:
        """Samples consumed by all ranks together in one micro-step."""
        return self.per_rank_batch * self.world_size

    def positions(self, micro_step: int) -> range:
        """The global stream positions this rank reads at ``micro_step``."""
        start = micro_step * self.global_batch + self.rank * self.per_rank_batch
        return range(start, start + self.per_rank_batch)

    def epoch_of(self, micro_step: int) -> int:
        """The epoch at the start of ``micro_step`` (the same on every rank, for the training log)."""
        return position_to_epoch(micro_step * self.global_batch, self.num_examples)

    def key(self, position: int) -> tuple[int, int]:
        """The ``(index, aug_seed)`` at one global position."""
        epoch, offset = divmod(position, self.num_examples)
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, epoch_permutation(self.seed, epoch, self.num_examples).tolist())
        return self._cached[1][offset], aug_seed_of(self.seed, position)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        micro_step = self.start_micro_step
        while True:
            for position in self.positions(micro_step):
                yield self.key(position)
            micro_step += 1
