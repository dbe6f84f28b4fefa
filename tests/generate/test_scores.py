"""Per-image scores: the DCT perceptual hash, CLIP similarity (built-in tiny CLIP), scores in the manifest.

The tiny CLIP has random weights, so a matching caption is not guaranteed to score higher than an unrelated
one; the tests check what does hold: the numbers are cosines, deterministic across loads, one per image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdcluster.config import ConfigError, GenerateConfig
from sdcluster.config.generate import FilterConfig, ScoresConfig
from sdcluster.generate import records, scores
from sdcluster.generate.job import generate_images
from sdcluster.models.tiny_clip import ensure_tiny_clip, tiny_clip_dir
from sdcluster.paths import sample_data_dir
from tests.generate.folders import make_folder, picture, record
from tests.generate.test_generate import gen_cfg


def sample(name: str) -> Image.Image:
    with Image.open(sample_data_dir() / name) as image:
        return image.convert("RGB")


def test_phash_is_near_for_a_resized_or_recompressed_copy_and_far_for_another_photo(tmp_path: Path) -> None:
    photo, other = sample("11 (1).JPG"), sample("11 (10).JPG")
    photo.save(tmp_path / "q40.jpg", quality=40)
    with Image.open(tmp_path / "q40.jpg") as recompressed:
        copies = [photo.resize((photo.width // 3, photo.height // 3)), recompressed.convert("RGB")]
    own = scores.phash(photo)
    assert len(own) == 16 and int(own, 16) < 2**64
    assert all(scores.hamming(own, scores.phash(copy)) <= 4 for copy in copies)
    # two photographs of jeans on the same white background still differ in many of the 64 bits
    assert scores.hamming(own, scores.phash(other)) > 12
    assert scores.hamming(own, scores.phash(photo.transpose(Image.Transpose.ROTATE_90))) > 12
    assert scores.phash(photo) == own  # a pure function of the pixels


def test_hamming_counts_differing_bits() -> None:
    assert scores.hamming("0" * 16, "0" * 16) == 0
    assert scores.hamming("0" * 16, "f" * 16) == 64
    assert scores.hamming("00000000000000ff", "000000000000000f") == 4


def test_near_duplicates_keep_the_lowest_index_and_compare_with_keepers_only() -> None:
    def rec(name: str, value: int | None) -> dict:
        return {"file": name, "scores": {} if value is None else {"phash": f"{value:016x}"}}

    rows = [
        rec("a", 0b0000),
        rec("b", 0b0011),  # 2 bits from a: a duplicate of a
        rec("c", 0b1111),  # 4 from a (too far), 2 from b; but b is no keeper, so c stays
        rec("d", None),  # no hash: neither compared nor a keeper
        rec("e", 0b1110),  # 1 from c
    ]
    assert scores.near_duplicates(rows, distance=2) == {"b": ("a", 2), "e": ("c", 1)}
    assert scores.near_duplicates(rows, distance=0) == {}


@pytest.fixture(scope="module")
def clip_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clip-cache")
    ensure_tiny_clip(root)
    return root


def test_tiny_clip_is_built_once_and_scores_are_deterministic_cosines(clip_root: Path) -> None:
    folder = tiny_clip_dir(clip_root)
    built = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_clip(clip_root) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == built  # found, not rebuilt
    images = [picture(1), picture(2), sample("11 (1).JPG")]
    prompts = ["dark blue jeans laid flat", "a red car", "light wash denim, back view"]
    first = scores.ClipScorer("tiny", clip_root).similarity(images, prompts)
    again = scores.ClipScorer("tiny", clip_root).similarity(images, prompts)  # a fresh load
    assert first == again
    assert len(first) == 3 and all(-1 <= value <= 1 for value in first)
    assert len(set(first)) == 3
    # each image is scored against its own prompt: batched, image k with prompt k gives what it gives alone
    scorer = scores.ClipScorer("tiny", clip_root)
    alone = [scorer.similarity([image], [prompt])[0] for image, prompt in zip(images, prompts, strict=True)]
    assert np.allclose(first, alone, atol=1e-5), (first, alone)
    swapped = scorer.similarity(images[:1], prompts[1:2])
    assert swapped[0] != first[0]


def test_scores_schema_rejects_impossible_values() -> None:
    with pytest.raises(ConfigError, match=r"clip_model.*neither a folder nor a hub id"):
        ScoresConfig(clip_model="no such model")
    assert ScoresConfig(clip_model="openai/clip-vit-large-patch14").clip_model.startswith("openai/")
    with pytest.raises(ConfigError, match=r"duplicate_distance.*0\.\.64"):
        ScoresConfig(duplicate_distance=65)
    with pytest.raises(ConfigError, match=r"min_clip.*\[-1, 1\]"):
        FilterConfig(min_clip=2.0)
    with pytest.raises(ConfigError, match=r"min_clip.*scores\.clip=true"):
        GenerateConfig(filter=FilterConfig(min_clip=0.2))
    with pytest.raises(ConfigError, match=r"drop_near_duplicates.*scores\.phash=true"):
        GenerateConfig(scores=ScoresConfig(phash=False), filter=FilterConfig(drop_near_duplicates=True))


def test_merge_fills_missing_scores_once_and_keeps_the_jobs(tmp_path: Path, clip_root: Path) -> None:
    rows = [record(0, 0), record(0, 1, scores={"clip": 0.5, "phash": "00000000000000ff"})]
    out = make_folder(tmp_path / "gen", rows)
    gen = GenerateConfig(scores=ScoresConfig(clip=True, clip_model="tiny"))
    records.merge_image_manifest(out, gen, clip_root)
    merged = records.read_image_manifest(out)
    assert merged[1]["scores"] == {"clip": 0.5, "phash": "00000000000000ff"}  # the job's, untouched
    assert merged[0]["scores"]["phash"] == scores.phash(picture(rows[0]["seed"]))
    assert -1 <= merged[0]["scores"]["clip"] <= 1
    filled = out / records.PARTS_DIR / scores.FILLED
    lines = filled.read_text()
    records.merge_image_manifest(out, gen, clip_root)  # a second merge reuses what the first computed
    assert filled.read_text() == lines and records.read_image_manifest(out) == merged


def test_merge_without_a_model_cache_fills_hashes_only(tmp_path: Path) -> None:
    out = make_folder(tmp_path / "gen", [record(0, 0)])
    records.merge_image_manifest(out, GenerateConfig(scores=ScoresConfig(clip=True)), cache_root=None)
    assert set(records.read_image_manifest(out)[0]["scores"]) == {"phash"}


@pytest.mark.slow
def test_the_job_records_clip_and_phash_of_what_it_rendered(tiny_model: Path, tmp_path: Path) -> None:
    # one image per prompt in one batch of two: the batch holds two different prompts
    cfg = gen_cfg(tmp_path, tiny_model, num_images=1, batch_size=2)
    cfg.generate.scores = ScoresConfig(clip=True, clip_model="tiny")
    cfg.cache_root = str(tmp_path / "cache")
    out = generate_images(cfg).out_dir
    rows = records.read_image_manifest(out)
    assert len(rows) == 2 and rows[0]["prompt"] != rows[1]["prompt"]
    for row in rows:
        with Image.open(out / row["file"]) as image:
            assert row["scores"]["phash"] == scores.phash(image.convert("RGB"))
            clip = scores.ClipScorer("tiny", cfg.cache_root).similarity(
                [image.convert("RGB")], [row["prompt"]]
            )
        assert np.isclose(row["scores"]["clip"], clip[0], atol=1e-5)  # batched in the job, alone here
    assert not (out / records.PARTS_DIR / scores.FILLED).exists()  # nothing was left for the merge
