"""StepSampler: ranks partition one global stream, and resuming is a pure function of the micro-step."""

from __future__ import annotations

import itertools

import pytest
import torch

from sdcluster.data import StepSampler, position_to_epoch


def _take(sampler: StepSampler, count: int) -> list[tuple[int, int]]:
    return list(itertools.islice(iter(sampler), count))


def _expected_indices(n: int, seed: int, count: int) -> list[int]:
    """The global stream as the spec defines it, computed without the module."""
    stream: list[int] = []
    for epoch in itertools.count():
        if len(stream) >= count:
            return stream[:count]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        stream += torch.randperm(n, generator=gen).tolist()
    raise AssertionError("unreachable")


def test_ranks_together_read_exactly_the_global_stream() -> None:
    n, batch, world, seed, steps = 10, 3, 2, 5, 7
    per_rank = [_take(StepSampler(n, batch, world, r, seed), steps * batch) for r in range(world)]

    merged = []
    for step in range(steps):
        for rank in range(world):
            merged += per_rank[rank][step * batch : (step + 1) * batch]

    assert [index for index, _ in merged] == _expected_indices(n, seed, steps * batch * world)
    aug_seeds = [s for _, s in merged]
    assert len(set(aug_seeds)) == len(aug_seeds)  # no global position is read twice


def test_ranks_read_different_samples() -> None:
    first = [_take(StepSampler(12, 3, 2, rank, seed=0), 3) for rank in (0, 1)]
    assert {i for i, _ in first[0]}.isdisjoint({i for i, _ in first[1]})


def test_each_epoch_visits_every_index_once_in_a_new_order() -> None:
    n = 10
    indices = [i for i, _ in _take(StepSampler(n, 4, 1, 0, seed=3), 3 * n)]
    epochs = [indices[e * n : (e + 1) * n] for e in range(3)]
    assert all(sorted(epoch) == list(range(n)) for epoch in epochs)
    assert epochs[0] != epochs[1]


def test_each_pass_over_an_image_gets_a_fresh_aug_seed() -> None:
    keys = _take(StepSampler(5, 5, 1, 0, seed=1), 15)
    seeds_of_zero = [s for i, s in keys if i == 0]
    assert len(seeds_of_zero) == 3
    assert len(set(seeds_of_zero)) == 3
    assert all(0 <= s < 2**63 for _, s in keys)


@pytest.mark.parametrize("rank", [0, 1])
def test_resume_yields_the_tail_of_the_uninterrupted_stream(rank: int) -> None:
    n, batch, world, seed, k, m = 7, 2, 2, 11, 5, 9
    full = _take(StepSampler(n, batch, world, rank, seed), (k + m) * batch)
    resumed = _take(StepSampler(n, batch, world, rank, seed, start_micro_step=k), m * batch)
    assert resumed == full[k * batch :]


def test_deterministic_across_instances_and_seed_dependent() -> None:
    a = _take(StepSampler(9, 2, 1, 0, seed=4), 30)
    assert a == _take(StepSampler(9, 2, 1, 0, seed=4), 30)
    assert a != _take(StepSampler(9, 2, 1, 0, seed=5), 30)


def test_epoch_of_micro_step() -> None:
    sampler = StepSampler(10, 3, 2, 1, seed=0)  # 6 samples per micro-step
    assert [sampler.epoch_of(s) for s in range(5)] == [0, 0, 1, 1, 2]
    assert position_to_epoch(19, 10) == 1
    assert list(sampler.positions(2)) == [15, 16, 17]


@pytest.mark.parametrize(
    "args",
    [(0, 1, 1, 0, 0), (4, 0, 1, 0, 0), (4, 1, 2, 2, 0), (4, 1, 2, -1, 0)],
)
def test_rejects_impossible_settings(args: tuple[int, int, int, int, int]) -> None:
    with pytest.raises(ValueError):
        StepSampler(*args)
    with pytest.raises(ValueError, match="start_micro_step"):
        StepSampler(4, 1, 1, 0, 0, start_micro_step=-1)
