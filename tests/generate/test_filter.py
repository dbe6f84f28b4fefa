"""``generate.filter``: rejects move to ``rejected/`` with a reason; nothing is deleted; reruns keep them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from sdcluster import paths
from sdcluster.config import GenerateConfig
from sdcluster.config.generate import FilterConfig, ScoresConfig
from sdcluster.generate import filter as rejects
from sdcluster.generate import records
from sdcluster.generate.__main__ import main
from sdcluster.generate.job import generate_images
from tests.generate.folders import make_folder, record
from tests.generate.test_generate import gen_cfg


def digests(folder: Path) -> dict[str, str]:
    """Every PNG under ``folder`` by name (wherever it moved) -> sha256 of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("p*.png")}


def filtered(min_clip: float | None = 0.2, duplicates: bool = True) -> GenerateConfig:
    return GenerateConfig(
        scores=ScoresConfig(clip=True),
        filter=FilterConfig(min_clip=min_clip, drop_near_duplicates=duplicates),
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """3 prompts x 3 images; p1-i1 scores low; p1-i2 and p2-i2 look like p1-i0 (p1-i0 itself scores low)."""
    rows = [record(p, i, scores={"clip": 0.3}) for p in range(3) for i in range(3)]
    rows[3]["scores"]["clip"] = 0.1  # p0001-i0000: low, and the look p1-i2 and p2-i2 share
    rows[4]["scores"]["clip"] = 0.15  # p0001-i0001: low
    same = {rows[5]["file"]: rows[3]["seed"], rows[8]["file"]: rows[3]["seed"]}
    return make_folder(tmp_path / "gen", rows, looks=same)


def test_rejects_move_with_their_reason_and_nothing_is_deleted(folder: Path) -> None:
    before = digests(folder)
    records.merge_image_manifest(folder, filtered())
    assert digests(folder) == before  # every image still there, byte for byte
    moved = sorted(p.name for p in (folder / rejects.REJECTED).glob("*.png"))
    assert moved == ["p0001-i0000.png", "p0001-i0001.png", "p0002-i0002.png"]
    assert not any((folder / name).exists() for name in moved)
    rows = {r["file"]: r for r in records.read_image_manifest(folder)}
    assert len(rows) == 9  # rejected images stay in the manifest, marked
    assert rows["p0001-i0000.png"]["rejected"] == {"reason": "low_clip", "clip": 0.1, "min_clip": 0.2}
    assert rows["p0001-i0001.png"]["rejected"]["reason"] == "low_clip"
    # p1-i0 was rejected for its score, so it keeps nothing out: p1-i2 is the keeper of that look
    assert "rejected" not in rows["p0001-i0002.png"]
    assert rows["p0002-i0002.png"]["rejected"] == {
        "reason": "near_duplicate",
        "of": "p0001-i0002.png",
        "distance": 0,
    }
    with Image.open(folder / records.CONTACT_SHEET) as sheet:  # 6 kept images: 3 x 2 tiles of 64 px
        assert sheet.size == (3 * 64, 2 * 64)
    logged = [
        json.loads(line) for line in (folder / rejects.REJECTED / rejects.REASONS).read_text().splitlines()
    ]
    assert {entry["file"] for entry in logged} == set(moved)


def test_a_rejection_is_final_and_merging_again_changes_nothing(folder: Path) -> None:
    records.merge_image_manifest(folder, filtered())
    manifest = (folder / records.IMAGE_MANIFEST).read_text()
    before = digests(folder)
    records.merge_image_manifest(folder, filtered())
    assert (folder / records.IMAGE_MANIFEST).read_text() == manifest
    # looser: nothing comes back
    records.merge_image_manifest(folder, filtered(min_clip=None, duplicates=False))
    assert (folder / records.IMAGE_MANIFEST).read_text() == manifest
    records.merge_image_manifest(folder)  # by hand, no settings.json: earlier rejections are still marked
    assert (folder / records.IMAGE_MANIFEST).read_text() == manifest
    assert digests(folder) == before


def test_a_merge_killed_between_reason_and_move_is_finished_by_the_next(folder: Path) -> None:
    reasons = folder / rejects.REJECTED / rejects.REASONS
    reasons.parent.mkdir()
    reasons.write_text(json.dumps({"file": "p0000-i0000.png", "rejected": {"reason": "stale"}}) + "\n")
    records.merge_image_manifest(folder, filtered())  # the logged decision without a move is not a rejection
    rows = {r["file"]: r for r in records.read_image_manifest(folder)}
    assert "rejected" not in rows["p0000-i0000.png"] and (folder / "p0000-i0000.png").is_file()
    assert rows["p0001-i0000.png"]["rejected"]["reason"] == "low_clip"


def test_a_rejected_image_counts_as_done_unless_redone(folder: Path) -> None:
    records.merge_image_manifest(folder, filtered())
    assert rejects.is_done(folder, "p0001-i0001.png") and rejects.is_done(folder, "p0000-i0000.png")
    assert not rejects.is_done(folder, "p0001-i0001.png", redo_rejected=True)
    assert not rejects.is_done(folder, "p0009-i0000.png")
    assert rejects.set_aside_for_redo(folder, ["p0001-i0001.png", "p0000-i0000.png"]) == 1
    (previous,) = (folder / rejects.REJECTED / rejects.PREVIOUS).iterdir()
    assert (previous / "p0001-i0001.png").is_file() and not rejects.is_done(folder, "p0001-i0001.png")


@pytest.mark.slow
def test_rerun_keeps_rejects_and_redo_rejected_makes_them_again(tiny_model: Path, tmp_path: Path) -> None:
    cfg = gen_cfg(tmp_path, tiny_model, num_images=2, batch_size=2)
    # every hash is within 64 bits of every other: all but the first image are near-duplicates of it
    cfg.generate.scores = ScoresConfig(duplicate_distance=64)
    cfg.generate.filter = FilterConfig(drop_near_duplicates=True)
    first = generate_images(cfg)
    out = first.out_dir
    assert first.generated == 4
    kept = records.image_files(out)
    assert [p.name for p in kept] == ["p0000-i0000.png"]
    rejected = sorted(rejects.rejected_files(out))
    assert len(rejected) == 3
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("p*.png")}

    again = generate_images(cfg)  # a rerun: nothing is made again, nothing moves
    assert (again.generated, again.skipped) == (0, 4)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("p*.png")} == stamps

    cfg.generate.redo_rejected = True
    redo = generate_images(cfg)
    assert (redo.generated, redo.skipped) == (3, 1)
    (previous,) = (out / rejects.REJECTED / rejects.PREVIOUS).iterdir()
    assert sorted(p.name for p in previous.glob("*.png")) == rejected  # the old copies are kept
    assert sorted(rejects.rejected_files(out)) == rejected  # made again, judged again, rejected again
    assert len(list(out.rglob("p*.png"))) == 7  # 4 images + 3 earlier copies: nothing deleted
    assert sum("rejected" in r for r in records.read_image_manifest(out)) == 3


def test_scores_and_filter_do_not_change_the_folder(tmp_path: Path) -> None:
    """A new threshold re-judges the images already made instead of making them again elsewhere."""
    plain = gen_cfg(tmp_path, tmp_path)
    judged = gen_cfg(tmp_path, tmp_path, redo_rejected=True)
    judged.generate.scores = ScoresConfig(clip=True, phash=False, duplicate_distance=9)
    judged.generate.filter = FilterConfig(min_clip=0.25)
    assert paths.generation_dir(judged) == paths.generation_dir(plain)
    assert paths.generation_dir(gen_cfg(tmp_path, tmp_path, steps=3)) != paths.generation_dir(plain)


def test_a_merge_by_hand_applies_the_filter_the_folder_was_made_with(folder: Path) -> None:
    settings = {"scores": {"clip": True}, "filter": {"min_clip": 0.2}, "resolved_prompts": []}
    (folder / records.SETTINGS).write_text(json.dumps(settings))
    assert main(["merge", str(folder)]) == 0
    assert sorted(rejects.rejected_files(folder)) == ["p0001-i0000.png", "p0001-i0001.png"]
    assert (folder / "gallery" / "index.html").is_file()
