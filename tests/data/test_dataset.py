"""Loading the shipped sample and turning rows into deterministic training tensors."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdcluster.data import (
    StepSampler,
    TrainImages,
    augment,
    collate,
    load_captioned_images,
    read_metadata,
    write_metadata,
)
from sdcluster.paths import sample_data_dir

RES = 32


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import CLIPTokenizer

    from sdcluster.models.tiny import write_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(folder)
    return CLIPTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory):
    return load_captioned_images(sample_data_dir(), cache_dir=tmp_path_factory.mktemp("hf-cache"))


@pytest.fixture(scope="module")
def noise() -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_sample_rows_are_sorted_and_captions_aligned(sample) -> None:
    metadata = read_metadata(sample_data_dir())
    by_name = {e["file_name"]: e["text"] for e in metadata}
    names = list(sample["file_name"])
    assert names == [e["file_name"] for e in metadata]  # the shipped file is already in natural order
    assert names.index("11 (2).JPG") < names.index("11 (10).JPG")
    assert list(sample["text"]) == [by_name[n] for n in names]
    assert sample[0]["image"].size == Image.open(sample_data_dir() / names[0]).size


def test_rows_follow_file_names_not_metadata_order(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    picked = ["11 (1).JPG", "11 (2).JPG", "11 (10).JPG"]
    for name in picked:
        shutil.copy(sample_data_dir() / name, folder / name)
    reverse = [json.dumps({"file_name": n, "text": f"caption of {n}"}) + "\n" for n in reversed(picked)]
    (folder / "metadata.jsonl").write_text("".join(reverse))  # not write_metadata: it would sort

    dataset = load_captioned_images(folder, cache_dir=tmp_path / "cache")

    assert list(dataset["file_name"]) == picked
    assert list(dataset["text"]) == [f"caption of {n}" for n in picked]


def test_load_errors_say_what_to_do(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="prepare"):
        load_captioned_images(folder)
    shutil.copy(sample_data_dir() / "11 (1).JPG", folder / "a.JPG")
    write_metadata(folder, [{"file_name": "a.JPG", "text": "x"}])
    with pytest.raises(ValueError, match="caption"):
        load_captioned_images(folder, caption_column="prompt", cache_dir=tmp_path / "cache")


def test_item_shapes_dtypes_and_range(sample, tokenizer) -> None:
    images = TrainImages(sample, tokenizer, RES, center_crop=False, random_flip=True)
    item = images[(4, 123)]
    pixels, ids = item["pixel_values"], item["input_ids"]
    assert len(images) == len(sample)
    assert pixels.shape == (3, RES, RES) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert pixels.min() < 0 < pixels.max()  # blue jeans on white: both ends of the range are used
    assert ids.shape == (tokenizer.model_max_length,) and ids.dtype == torch.long
    assert ids[0] == tokenizer.bos_token_id
    assert ids.tolist() == tokenizer(sample[4]["text"], padding="max_length", truncation=True).input_ids


def test_same_key_gives_identical_tensors(sample, tokenizer) -> None:
    a = TrainImages(sample, tokenizer, RES, center_crop=False, random_flip=True)
    b = TrainImages(sample, tokenizer, RES, center_crop=False, random_flip=True)
    assert torch.equal(a[(2, 99)]["pixel_values"], a[(2, 99)]["pixel_values"])
    assert torch.equal(a[(2, 99)]["pixel_values"], b[(2, 99)]["pixel_values"])


def test_aug_seed_changes_random_crops(noise: Image.Image) -> None:
    crops = {
        augment(noise, RES, center_crop=False, random_flip=False, aug_seed=s).numpy().tobytes()
        for s in range(8)
    }
    assert len(crops) > 2


def test_random_flip_mirrors_about_half_the_time(noise: Image.Image) -> None:
    plain = augment(noise, RES, center_crop=True, random_flip=False, aug_seed=0)
    outs = [augment(noise, RES, center_crop=True, random_flip=True, aug_seed=s) for s in range(16)]
    flipped = [torch.equal(o, torch.flip(plain, dims=[2])) for o in outs]
    unflipped = [torch.equal(o, plain) for o in outs]
    assert all(f != u for f, u in zip(flipped, unflipped, strict=True))
    assert 0 < sum(flipped) < len(outs)


def test_center_crop_without_flip_ignores_aug_seed(sample, tokenizer) -> None:
    images = TrainImages(sample, tokenizer, RES, center_crop=True, random_flip=False)
    first = images[(1, 0)]["pixel_values"]
    for seed in (1, 7, 2**62 + 3):
        assert torch.equal(images[(1, seed)]["pixel_values"], first)


def test_center_crop_takes_the_middle() -> None:
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.paste((255, 255, 255), (10, 0, 20, 10))  # right half white
    out = augment(image, 10, center_crop=True, random_flip=False, aug_seed=0)
    assert out[:, :, :5].eq(-1).all() and out[:, :, 5:].eq(1).all()


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.paste((255, 255, 255), (10, 0, 20, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: displayed rotated 90 degrees clockwise
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif, quality=95)
    out = augment(Image.open(buffer), 10, center_crop=True, random_flip=False, aug_seed=0)
    assert out[:, 0, :].mean() < -0.8 and out[:, -1, :].mean() > 0.8  # left half became the top half


def test_dataloader_batches_match_direct_items(sample, tokenizer) -> None:
    images = TrainImages(sample, tokenizer, RES, center_crop=False, random_flip=True)
    sampler = StepSampler(len(images), per_rank_batch=2, world_size=1, rank=0, seed=0)
    loader = torch.utils.data.DataLoader(images, batch_size=2, sampler=sampler, collate_fn=collate)
    batch = next(iter(loader))
    keys = list(zip(range(2), iter(sampler), strict=False))
    assert batch["pixel_values"].shape == (2, 3, RES, RES)
    assert batch["input_ids"].shape == (2, tokenizer.model_max_length)
    expected = collate([images[key] for _, key in keys])
    assert torch.equal(batch["pixel_values"], expected["pixel_values"])
    assert torch.equal(batch["input_ids"], expected["input_ids"])


def test_plain_int_keys_are_rejected(sample, tokenizer) -> None:
    images = TrainImages(sample, tokenizer, RES, center_crop=True, random_flip=False)
    with pytest.raises(TypeError, match="StepSampler"):
        images[0]
