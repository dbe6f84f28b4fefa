"""Which example each rank reads at each micro-step, as a pure function of the step counter.

The global sample stream is the concatenation of per-epoch permutations; micro-step ``s`` covers global
positions ``[s*B*W, (s+1)*B*W)`` and rank ``r`` takes its ``B`` consecutive slots in that window. Because a
sample's position, index and augmentation seed depend only on ``(seed, s, rank)``, resuming needs nothing but
the micro-step counter the checkpoint already has: no sampler state, no skipping through a DataLoader (the
diffusers script dropped its skip logic and replays the whole epoch instead).

Epochs straddle micro-steps when ``B*W`` does not divide the dataset size; that is deliberate, so every
example is seen equally often and no partial batch is ever dropped or padded.

With aspect-ratio buckets (``data.buckets``) a batch must hold images of one size, so
:class:`BucketSampler` cuts each epoch into whole global batches of one bucket each (see there), still a
pure function of ``(seed, micro-step, rank)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

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
    and pull exactly one batch per micro-step; the loop decides when to stop. ``num_examples`` counts the
    epoch's stream items; with ``rows`` (:func:`sdcluster.data.sources.stream_rows`) item ``i`` reads dataset
    row ``rows[i]``, so an image with ``repeats`` is read that many times an epoch but stored once.
    """

    def __init__(
        self,
        num_examples: int,
        per_rank_batch: int,
        world_size: int,
        rank: int,
        seed: int,
        start_micro_step: int = 0,
        rows: Sequence[int] | None = None,
    ) -> None:
        if rows is not None and len(rows) != num_examples:
            raise ValueError(f"rows lists {len(rows)} stream items, num_examples says {num_examples}")
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
        self.rows = rows
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

    def row(self, item: int) -> int:
        """The dataset row of stream item ``item``: itself, or with ``rows`` (``data.sources``' repeats list
        a row several times an epoch) the row it stands for."""
        return item if self.rows is None else self.rows[item]

    def key(self, position: int) -> tuple[int, int]:
        """The ``(index, aug_seed)`` at one global position."""
        epoch, offset = divmod(position, self.num_examples)
        if self._cached is None or self._cached[0] != epoch:
            self._cached = (epoch, epoch_permutation(self.seed, epoch, self.num_examples).tolist())
        return self.row(self._cached[1][offset]), aug_seed_of(self.seed, position)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        micro_step = self.start_micro_step
        while True:
            for position in self.positions(micro_step):
                yield self.key(position)
            micro_step += 1


class BucketSampler(StepSampler):
    """:class:`StepSampler` for aspect-ratio buckets: every global batch (all ranks' samples of one
    micro-step) holds images of one bucket, so every rank steps on the same bucket and each rank's batch
    stacks into tensors of one shape.

    Epoch ``e``, as kohya sd-scripts' bucket manager does it: each bucket's images in a shuffled order, cut
    into global batches of ``B*W``, and the list of all buckets' batches shuffled; micro-step ``s`` reads
    batch ``s % L`` of epoch ``s // L`` (``L``: :attr:`steps_per_epoch`), rank ``r`` its ``B`` slots from
    ``r*B``. Everything comes from ``(seed, e)``, so resume needs only the micro-step, as without buckets.
    ``bucket_of`` is per stream item: with ``rows`` (repeats), each item's bucket is its row's.

    A bucket whose images do not fill its last batch (or, with fewer images than ``B*W``, its only one)
    has that batch filled by going round its own shuffled order again: a bucket of 3 images with a global
    batch of 4 gives one batch with one image twice. Every batch is full and of one size, no image is
    dropped, and each image is read at least once an epoch; those of such a bucket up to ``B*W - 1`` times
    more (kohya yields a short batch instead, SimpleTuner drops the bucket: a short batch would change the
    gradient's scale and, across ranks, the shapes).
    """

    def __init__(
        self,
        bucket_of: Sequence[int],
        per_rank_batch: int,
        world_size: int,
        rank: int,
        seed: int,
        start_micro_step: int = 0,
        rows: Sequence[int] | None = None,
    ) -> None:
        super().__init__(len(bucket_of), per_rank_batch, world_size, rank, seed, start_micro_step, rows)
        members: dict[int, list[int]] = {}
        for index, bucket in enumerate(bucket_of):
            members.setdefault(int(bucket), []).append(index)
        self.members = dict(sorted(members.items()))
        self.steps_per_epoch = sum(math.ceil(len(rows) / self.global_batch) for rows in self.members.values())
        self._epoch: tuple[int, list[tuple[int, list[int]]]] | None = None

    def epoch_batches(self, epoch: int) -> list[tuple[int, list[int]]]:
        """``(bucket, indices)`` of every global batch of ``epoch``, in the order they are read."""
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        generator = torch.Generator().manual_seed(self.seed * _EPOCH_SEED_STRIDE + epoch)
        size, batches = self.global_batch, []
        for bucket, rows in self.members.items():
            order = [rows[i] for i in torch.randperm(len(rows), generator=generator).tolist()]
            filled = [order[i % len(order)] for i in range(math.ceil(len(order) / size) * size)]
            batches += [(bucket, filled[k : k + size]) for k in range(0, len(filled), size)]
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        self._epoch = (epoch, shuffled)
        return shuffled

    def _batch(self, micro_step: int) -> tuple[int, list[int]]:
        epoch, k = divmod(micro_step, self.steps_per_epoch)
        return self.epoch_batches(epoch)[k]

    def bucket_at(self, micro_step: int) -> int:
        """The bucket every rank reads at ``micro_step``."""
        return self._batch(micro_step)[0]

    def epoch_of(self, micro_step: int) -> int:
        return micro_step // self.steps_per_epoch

    def key(self, position: int) -> tuple[int, int]:
        micro_step, slot = divmod(position, self.global_batch)
        return self.row(self._batch(micro_step)[1][slot]), aug_seed_of(self.seed, position)
