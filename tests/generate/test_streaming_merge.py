"""The streaming merge: parts indexed (not loaded), records read back in order, exact fast near-duplicates."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sdcluster import atomic
from sdcluster.generate import records, scores
from sdcluster.generate.duplicates import KeeperIndex, popcount
from sdcluster.generate.images import sample_per_group
from sdcluster.generate.manifest_index import PartIndex, file_key, image_name_of
from tests.generate.folders import make_folder, record


def brute_force(hashes: list[int | None], distance: int) -> dict[int, tuple[int, int]]:
    """The all-pairs rule: each hashed image against every earlier keeper, nearest and earliest wins."""
    keepers: list[tuple[int, int]] = []
    found: dict[int, tuple[int, int]] = {}
    for n, code in enumerate(hashes):
        if code is None:
            continue
        near = min(((code ^ h).bit_count(), k) for k, h in keepers) if keepers else None
        if near is not None and near[0] <= distance:
            found[n] = (near[1], near[0])
        else:
            keepers.append((n, code))
    return found


@pytest.mark.parametrize("distance", [0, 1, 4, 9, 16, 20])
def test_multi_index_hashing_finds_exactly_what_all_pairs_finds(distance: int) -> None:
    rng = np.random.default_rng(distance)
    hashes: list[int | None] = []
    for _ in range(60):  # clusters of look-alikes around random centres, plus strangers and unhashed images
        centre = int(rng.integers(0, 2**63)) << 1
        hashes.append(centre)
        for _ in range(int(rng.integers(0, 5))):
            flips = rng.choice(64, size=int(rng.integers(0, distance + 3)), replace=False)
            hashes.append(centre ^ sum(1 << int(b) for b in flips))
        if rng.random() < 0.2:
            hashes.append(None)
    rows = [
        {"file": f"f{n}", "scores": {} if h is None else {"phash": f"{h:016x}"}} for n, h in enumerate(hashes)
    ]
    expected = {f"f{n}": (f"f{k}", bits) for n, (k, bits) in brute_force(hashes, distance).items()}
    assert expected  # the clusters do make duplicates, so the comparison is not vacuous
    assert scores.near_duplicates(rows, distance) == expected


def test_keeper_index_breaks_ties_towards_the_earliest_keeper() -> None:
    index = KeeperIndex(2)
    first, second = index.add(0b0011), index.add(0b1100)
    assert (first, second) == (0, 1)
    assert index.nearest(0b0110) == (0, 2)  # 2 bits from both keepers: the earlier one
    assert index.nearest(0b1111_0000) is None
    assert popcount(np.array([0, 2**64 - 1], dtype=np.uint64)).tolist() == [0, 64]


def test_parts_merge_in_order_with_a_backfilled_record_first_and_each_image_once(tmp_path: Path) -> None:
    rows = [record(p, i) for p in range(3) for i in range(2)]
    out = make_folder(tmp_path / "gen", rows)
    part = records.part_path(out, 0, 1)
    # A rerun after a crash: the record of p0002-i0001 was lost and is re-added at the start of a new part.
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:-1]))
    backfill = records.part_path(out, 1, 2)
    backfill.write_text(lines[-1])
    records.append_record(backfill, rows[1] | {"from": "second part"})  # a duplicate: the first part wins
    with open(backfill, "a") as fh:
        fh.write('{"file": "p0000-i00')  # a line torn by a kill mid-append: skipped

    records.merge_image_manifest(out)
    merged = records.read_image_manifest(out)
    assert [r["file"] for r in merged] == [r["file"] for r in rows]
    assert "from" not in merged[1]
    metadata = (out / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(line)["file_name"] for line in metadata] == [r["file"] for r in rows]
    assert (out / "gallery" / "index.html").is_file()


def test_a_deleted_image_leaves_the_manifest_and_an_unrecorded_one_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [record(0, i) for i in range(4)]
    out = make_folder(tmp_path / "gen", rows)
    (out / rows[2]["file"]).unlink()
    extra = make_folder(tmp_path / "other", [record(0, 7)])
    (extra / "p0000-i0007.png").rename(out / "p0000-i0007.png")
    with caplog.at_level(logging.WARNING):
        records.merge_image_manifest(out)
    assert [r["file"] for r in records.read_image_manifest(out)] == [rows[n]["file"] for n in (0, 1, 3)]
    assert "1 images have no record (e.g. p0000-i0007.png)" in caplog.text
    assert records.recorded_files(out) == {r["file"] for r in rows}  # the part still holds all four


def test_index_keys_sort_like_prompt_then_image_and_name_back() -> None:
    names = ["p0002-i0000.png", "p0001-i0010.png", "p0001-i0002.png", "p12345-i0001.png"]
    keys = sorted(file_key(n) for n in names)
    assert [image_name_of(k) for k in keys] == [names[2], names[1], names[0], names[3]]
    assert file_key("contact_sheet.png") is None and file_key(".p0001-i0001.png.x.tmp") is None


def test_index_holds_a_few_bytes_per_record(tmp_path: Path) -> None:
    part = tmp_path / "shard-0-of-1.jsonl"
    atomic.append_jsonl(part, record(0, 0))
    with open(part, "a") as fh:
        for n in range(1, 5000):
            fh.write(json.dumps(record(n // 100, n % 100, prompt="x" * 500)) + "\n")
    index = PartIndex([part])
    assert len(index) == 5000
    assert (index.keys.nbytes + index.part.nbytes + index.offset.nbytes) / len(index) == 20
    assert next(iter(index.records()))["file"] == "p0000-i0000.png"


def test_contact_sheet_sample_from_a_stream_matches_the_list() -> None:
    keyed = [(f"group {n % 7 if n < 900 else 'late'}", Path(f"{n}.png")) for n in range(2000)]
    passes = []

    def stream() -> Iterator[tuple[str, Path]]:  # read twice by the sampler
        passes.append(1)
        return iter(keyed)

    picked = sample_per_group(stream, max_tiles=64)
    assert picked == sample_per_group(keyed, max_tiles=64)
    assert len(passes) == 2 and 0 < len(picked) <= 64
    assert {p.name for p in picked} & {f"{n}.png" for n in range(900, 2000)}  # the late group is sampled
