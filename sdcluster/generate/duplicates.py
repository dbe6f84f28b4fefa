"""Near-duplicate perceptual hashes, found exactly in near-linear time by multi-index hashing.

Comparing each image with every keeper is quadratic: at 100,000 images, billions of 64-bit comparisons. By
pigeonhole, two hashes within ``d`` bits of each other agree exactly on at least one of ``d + 1`` disjoint
chunks of their bits, so only keepers that share a chunk with an image can be within ``d`` bits of it: one
table per chunk finds those candidates, and their exact distances decide. The answer is the same as the
all-pairs comparison (nearest keeper, the earliest one on a tie), only found without looking at the rest.

Memory: each keeper's hash (8 bytes) and its number in ``d + 1`` bucket arrays (4 bytes each). With many
chunks of few bits each, buckets grow towards all keepers; past :data:`_MAX_TABLES` tables the comparison
with every keeper (vectorised) is as fast, so that is used.
"""

from __future__ import annotations

import itertools
from array import array

import numpy as np

_MAX_TABLES = 16  # 17 chunks would be under 4 bits: buckets of a sixteenth of all keepers or more


def popcount(values: np.ndarray) -> np.ndarray:
    """Set bits per uint64 (numpy 2 has ``bitwise_count``; numpy 1 counts the unpacked bytes)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    return np.unpackbits(values.view(np.uint8)).reshape(-1, 64).sum(axis=1)


def _chunks(distance: int) -> list[tuple[int, int]]:
    """``distance + 1`` disjoint (shift, mask) bit ranges covering the 64 bits, as even as possible."""
    count = distance + 1
    bounds = [round(k * 64 / count) for k in range(count + 1)]
    return [(lo, (1 << (hi - lo)) - 1) for lo, hi in itertools.pairwise(bounds)]


class KeeperIndex:
    """Keepers added in order; :meth:`nearest` finds the earliest nearest one within ``distance`` bits."""

    def __init__(self, distance: int) -> None:
        self.distance = distance
        self.count = 0
        self.hashes = np.empty(1024, dtype=np.uint64)  # grown by doubling, never appended one by one
        self.chunks = _chunks(distance) if distance < _MAX_TABLES else []
        self.tables: list[dict[int, array]] = [{} for _ in self.chunks]

    def nearest(self, code: int) -> tuple[int, int] | None:
        """(keeper number, bits apart) of the nearest keeper within ``distance``; ties: the earliest."""
        if not self.count:
            return None
        if self.chunks:
            buckets = [
                table.get((code >> shift) & mask)
                for table, (shift, mask) in zip(self.tables, self.chunks, strict=True)
            ]
            found = [np.frombuffer(b, dtype=np.uint32) for b in buckets if b is not None]
            if not found:
                return None
            candidates = np.unique(np.concatenate(found))  # sorted: argmin then takes the earliest
        else:
            candidates = np.arange(self.count)
        bits = popcount(np.bitwise_xor(self.hashes[candidates], np.uint64(code)))
        best = int(np.argmin(bits))
        return (int(candidates[best]), int(bits[best])) if int(bits[best]) <= self.distance else None

    def add(self, code: int) -> int:
        """Make ``code`` a keeper; return its number."""
        if self.count == self.hashes.size:
            self.hashes = np.concatenate([self.hashes, np.empty_like(self.hashes)])
        self.hashes[self.count] = np.uint64(code)
        for table, (shift, mask) in zip(self.tables, self.chunks, strict=True):
            table.setdefault((code >> shift) & mask, array("I")).append(self.count)
        self.count += 1
        return self.count - 1
