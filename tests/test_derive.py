"""Every value derived from a hash stays bit-identical: image seeds and names, split membership, training
noise, augmentation crops and rendezvous ports are all on disk or in people's notes already.

The literals were computed with the hand-written derivations that :mod:`sdcluster.derive` replaced; a change
to the byte string, the hash, the byte order or the bit selection of any site fails here.
"""

from __future__ import annotations

import math

import pytest

from sdcluster import derive
from sdcluster.data.sampler import aug_seed_of
from sdcluster.generate.dataset_export import split_of
from sdcluster.generate.plan import item_seed
from sdcluster.generate.prompts import _unit
from sdcluster.runtime.distributed import rendezvous_port
from sdcluster.train.loss import step_generator


@pytest.mark.parametrize(
    ("job_id", "port"), [("12345", 29113), ("12345_7", 29557), ("local-abc", 20679), ("", 29763)]
)
def test_rendezvous_port_is_unchanged(job_id: str, port: int) -> None:
    assert rendezvous_port(job_id) == port


@pytest.mark.parametrize(
    ("key", "seed"),
    [
        ((0, 0, 0), 2696329656458929524),
        ((42, 7, 1), 8873385399728680736),
        ((1234, 100000, 3), 7035640538665022236),
    ],
)
def test_step_generator_seed_is_unchanged(key: tuple[int, int, int], seed: int) -> None:
    assert step_generator(*key).initial_seed() == seed


@pytest.mark.parametrize(
    ("key", "seed"),
    [((0, 0), 6155466857423425634), ((42, 17), 6868882368436757958), ((7, 10**9), 2539537284892453011)],
)
def test_augmentation_seed_is_unchanged(key: tuple[int, int], seed: int) -> None:
    assert aug_seed_of(*key) == seed


@pytest.mark.parametrize(
    ("parts", "unit"),
    [
        ((0, "color", 3), 0.9453896321223944),
        (("a",), 0.9401271565778406),
        ((42, 1, 2, "x"), 0.17238926149036105),
    ],
)
def test_slot_draw_unit_is_unchanged(parts: tuple[object, ...], unit: float) -> None:
    assert _unit(*parts) == unit


@pytest.mark.parametrize(
    ("key", "seed"),
    [
        ((0, 0, 0), 8805517550141489345),
        ((1234, 3, 7), 5288173159185436704),
        ((2**40, 9999, 1), 6166430328284459781),
    ],
)
def test_image_seed_is_unchanged(key: tuple[int, int, int], seed: int) -> None:
    assert item_seed(*key) == seed


@pytest.mark.parametrize(
    ("seed", "file", "unit"),
    [
        (0, "p0000-i0000.png", 0.8958279615581471),
        (7, "p0003-i0001.png", 0.6038854841592599),
        (42, "a.png", 0.8868323845862867),
    ],
)
def test_split_membership_is_unchanged(seed: int, file: str, unit: float) -> None:
    """A row goes to validation when its unit is below the fraction: at exactly its unit it is still
    train, one float above it is validation, which pins the unit to the last bit."""
    split = {"by": "fraction", "seed": seed}
    assert split_of({"file_name": file}, split | {"fraction": unit}) == "train"
    assert split_of({"file_name": file}, split | {"fraction": math.nextafter(unit, 1.0)}) == "validation"


def test_derive_int_takes_the_top_bits_and_units_stay_in_range() -> None:
    full = derive.derive_int("x", 1)
    assert derive.derive_int("x", 1, bits=63) == full >> 1
    assert derive.derive_int("x", 1, bits=53) == full >> 11
    assert derive.derive_unit("x", 1) == (full >> 11) / 2**53
    assert 0.0 <= derive.derive_unit("x", 1) < 1.0
    assert derive.derive_int("x", 1) != derive.derive_int("x", 2) != derive.derive_int("x1")


def test_bad_bit_count_is_refused() -> None:
    with pytest.raises(ValueError, match="bits"):
        derive.derive_int("x", bits=65)
