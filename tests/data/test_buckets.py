"""Aspect-ratio buckets (``data.buckets``): the sizes, which one an image goes to, batches of one bucket on
every rank, images cropped to their bucket (and cached so), SDXL's size and crop numbers, ``data validate``.

The test images are made here at known non-square sizes (the shipped sample set is square), so the buckets
and crops they get are written out by hand, not read from the code under test.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdcluster.config import ConfigError
from sdcluster.data.buckets import assign, cover_size, histogram, make_buckets
from sdcluster.data.sampler import BucketSampler
from sdcluster.paths import sample_data_dir

# The tiny models train at 64 px: side 64 in steps of 16 within 1:2..2:1 gives exactly these three.
TINY = ["data.buckets.enabled=true", "data.buckets.step=16"]
TALL, SQUARE, WIDE = (48, 80), (64, 64), (80, 48)
# file name, (width, height), the bucket it goes to
IMAGES = [
    ("a_tall.png", (150, 250), TALL),  # 0.6: exactly the tall bucket's ratio
    ("b_wide.png", (260, 150), WIDE),  # 1.73: closer to 1.67 than to 1
    ("c_square.png", (200, 190), SQUARE),
    ("d_very_tall.png", (90, 300), TALL),  # 0.3: beyond the range, the tallest bucket
    ("e_wide.png", (250, 150), WIDE),
]


def make_bucket_folder(dest: Path, images=IMAGES, suffix: str = "") -> Path:
    """Sample photos resized to non-square sizes, with their captions (``suffix``: a fresh cache key)."""
    rows = [json.loads(line) for line in (sample_data_dir() / "metadata.jsonl").read_text().splitlines()]
    dest.mkdir(parents=True)
    with open(dest / "metadata.jsonl", "w") as fh:
        for (name, size, _), row in zip(images, itertools.cycle(rows), strict=False):
            with Image.open(sample_data_dir() / row["file_name"]) as photo:
                photo.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(dest / name)
            fh.write(json.dumps({"file_name": name, "text": row["text"] + suffix}) + "\n")
    return dest


def test_bucket_sizes_follow_kohyas_rule():
    assert [b.size for b in make_buckets(64, 16, 2.0)] == [TALL, SQUARE, WIDE]
    sdxl = make_buckets(1024, 64, 2.0)
    sizes = {b.size for b in sdxl}
    # SDXL's well-known buckets, and none outside the area, the step or the ratio range
    assert {(1024, 1024), (832, 1216), (1216, 832), (896, 1152), (768, 1344), (1344, 768)} <= sizes
    assert (704, 1472) not in sizes, "1:2.09 is outside 1:2"
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024**2 for w, h in sizes)
    assert all(0.5 <= w / h <= 2 for w, h in sizes)
    assert all((h, w) in sizes for w, h in sizes), "every bucket has its transpose"
    assert [b.aspect for b in sdxl] == sorted(b.aspect for b in sdxl)
    assert [b.size for b in make_buckets(512, 64, 1.0)] == [(512, 512)]
    with pytest.raises(ConfigError, match=r"data\.buckets\.side"):
        make_buckets(32, 64)


def test_each_image_goes_to_the_bucket_closest_to_its_aspect_ratio():
    buckets = make_buckets(64, 16, 2.0)
    for _, size, bucket in IMAGES:
        assert buckets[assign(size, buckets)].size == bucket, size
    sdxl = make_buckets(1024, 64, 2.0)
    for width, height in itertools.product(range(100, 3000, 230), range(100, 3000, 370)):
        here, there = sdxl[assign((width, height), sdxl)], sdxl[assign((height, width), sdxl)]
        assert (here.width, here.height) == (there.height, there.width), "transposed images, transposed"
    counts = histogram([size for _, size, _ in IMAGES], buckets)
    assert [(b.size, n) for b, n in counts] == [(TALL, 2), (SQUARE, 1), (WIDE, 2)]


def test_cover_size_is_the_old_square_resize_and_covers_a_bucket():
    for size in [(192, 192), (640, 480), (333, 1000), (64, 80)]:
        short = 64 / min(size)  # what the square crop has always resized to
        assert cover_size(size, (64, 64)) == (max(64, int(size[0] * short)), max(64, int(size[1] * short)))
    assert cover_size((260, 150), WIDE) == (83, 48)
    assert cover_size((150, 250), TALL) == (48, 80)
    assert cover_size((90, 300), TALL) == (48, 160)


def test_bucket_settings_are_checked_and_join_the_identity_only_when_on(make_cfg):
    from sdcluster.identity import run_hash

    with pytest.raises(ConfigError, match=r"data\.buckets\.step"):
        make_cfg(["data.buckets.step=12"])
    with pytest.raises(ConfigError, match=r"data\.buckets\.max_aspect"):
        make_cfg(["data.buckets.max_aspect=0.5"])
    with pytest.raises(ConfigError, match=r"data\.buckets\.side"):
        make_cfg(["data.buckets.side=32"])
    base = run_hash(make_cfg())
    assert run_hash(make_cfg(["data.buckets.step=16"])) == base, "settings of buckets that are off"
    on = run_hash(make_cfg(TINY))
    assert on != base
    assert run_hash(make_cfg([*TINY, "data.buckets.max_aspect=1.5"])) != on
    assert run_hash(make_cfg([*TINY, "data.num_workers=2"])) == on


def _take(sampler: BucketSampler, steps: int) -> list[list[tuple[int, int]]]:
    keys = list(itertools.islice(iter(sampler), steps * sampler.per_rank_batch))
    return [keys[s * sampler.per_rank_batch : (s + 1) * sampler.per_rank_batch] for s in range(steps)]


# 11 images in 3 buckets of 5, 4 and 2: with a global batch of 4 the last one is smaller than a batch
BUCKET_OF = [0, 1, 2, 0, 1, 0, 1, 0, 2, 1, 0]


def test_every_rank_steps_on_the_same_bucket_and_ranks_read_whole_batches():
    world, batch, steps = 2, 2, 12
    ranks = [_take(BucketSampler(BUCKET_OF, batch, world, rank, seed=3), steps) for rank in range(world)]
    sampler = BucketSampler(BUCKET_OF, batch, world, 0, seed=3)
    assert sampler.steps_per_epoch == 2 + 1 + 1  # ceil(5/4) + ceil(4/4) + ceil(2/4)
    seen_buckets = set()
    for step in range(steps):
        bucket = sampler.bucket_at(step)
        seen_buckets.add(bucket)
        global_batch = [index for rank in ranks for index, _ in rank[step]]
        assert {BUCKET_OF[i] for i in global_batch} == {bucket}, f"step {step} mixes buckets"
        assert global_batch == sampler.epoch_batches(step // 4)[step % 4][1]
    assert seen_buckets == {0, 1, 2}
    aug_seeds = [seed for rank in ranks for keys in rank for _, seed in keys]
    assert len(set(aug_seeds)) == len(aug_seeds), "every slot gets its own augmentation seed"


def test_an_epoch_reads_every_image_and_fills_short_buckets_from_their_own_images():
    sampler = BucketSampler(BUCKET_OF, 4, 1, 0, seed=0)
    for epoch in range(3):
        batches = sampler.epoch_batches(epoch)
        read = [i for _, indices in batches for i in indices]
        assert set(read) == set(range(len(BUCKET_OF))), "no image is dropped"
        small = [indices for bucket, indices in batches if bucket == 2]
        assert len(small) == 1 and sorted(set(small[0])) == [2, 8], "2 images fill a batch of 4"
        assert sorted(small[0]) == [2, 2, 8, 8], "each image of the short bucket twice"
        assert all(len(indices) == 4 for _, indices in batches)
    assert sampler.epoch_batches(0) != sampler.epoch_batches(1), "a new order each epoch"
    one = BucketSampler([0, 1, 1, 1], 4, 1, 0, seed=0)
    assert [indices for bucket, indices in one.epoch_batches(0) if bucket == 0] == [[0, 0, 0, 0]]


@pytest.mark.parametrize("rank", [0, 1])
def test_bucket_sampler_resumes_mid_epoch_exactly_and_follows_the_seed(rank: int):
    full = _take(BucketSampler(BUCKET_OF, 2, 2, rank, seed=11), 13)
    for k in (1, 3, 5, 9):  # inside an epoch of 4 micro-steps and across
        assert _take(BucketSampler(BUCKET_OF, 2, 2, rank, seed=11, start_micro_step=k), 13 - k) == full[k:]
    assert full == _take(BucketSampler(BUCKET_OF, 2, 2, rank, seed=11), 13)
    assert full != _take(BucketSampler(BUCKET_OF, 2, 2, rank, seed=12), 13)


def test_images_are_cropped_to_their_bucket_with_the_real_size_and_crop_numbers(make_cfg, tmp_path):
    """Center crops of known sizes: each tensor has its bucket's shape and SDXL's numbers are the image's
    original size, the crop's top-left in the resized image, and the bucket's height and width."""
    from sdcluster.data.buckets import buckets_of
    from sdcluster.data.dataset import TrainImages, collate, load_captioned_images
    from sdcluster.models.load import load_components

    folder = make_bucket_folder(tmp_path / "data")
    cfg = make_cfg([*TINY, "data=imagefolder", f"data.path={folder}"])
    comps = load_components(cfg.model, cfg.cache_root)
    rows, tokenizers = load_captioned_images(folder), comps.family.tokenizers(comps)
    images = TrainImages(rows, tokenizers, 64, True, False, buckets=buckets_of(cfg))
    # (original h, w, crop top, left, target h, w): b_wide resizes to 83x48, d_very_tall to 48x160
    expected = {
        0: [250, 150, 0, 0, 80, 48],
        1: [150, 260, 0, 2, 48, 80],
        2: [190, 200, 0, 2, 64, 64],
        3: [300, 90, 40, 0, 80, 48],
    }
    for index, numbers in expected.items():
        example = images[(index, 0)]
        height, width = numbers[4:]
        assert example["pixel_values"].shape == (3, height, width)
        assert example["time_ids"].tolist() == numbers
    batch = collate([images[(1, 0)], images[(4, 5)]])  # one bucket: the batch stacks
    assert batch["pixel_values"].shape == (2, 3, 48, 80)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "tiny_sdxl"])
def test_cached_bucket_rows_are_the_encoded_bucket_crops(make_cfg, tmp_path, model):
    """The cache stores each image at its bucket's size (one array per bucket): every cached example is
    the VAE posterior of the crop the image path makes, with the same size and crop numbers."""
    from sdcluster.data import latent_build
    from sdcluster.data.buckets import buckets_of
    from sdcluster.data.dataset import TrainImages, load_captioned_images
    from sdcluster.models.load import load_components
    from tests.data.test_latent_cache import ONE_PROCESS

    folder = make_bucket_folder(tmp_path / "data", suffix=f" buckets {model}")
    cfg = make_cfg([*TINY, f"model={model}", "data=imagefolder", f"data.path={folder}"])
    comps = load_components(cfg.model, cfg.cache_root)
    dataset = load_captioned_images(folder)
    cached = latent_build.open_or_build(cfg, dataset, comps, ONE_PROCESS)
    assert cached is not None, "crops that cover a bucket are few: the cache is used"
    assert sorted(cached.posterior) == ["posterior.48x80", "posterior.64x64", "posterior.80x48"]
    images = TrainImages(dataset, comps.family.tokenizers(comps), 64, False, True, buckets=buckets_of(cfg))
    flips = set()
    for index, seed in itertools.product(range(len(IMAGES)), range(6)):
        image, row = images[(index, seed)], cached[(index, seed)]
        with torch.no_grad():
            params = comps.vae.encode(image["pixel_values"][None]).latent_dist.parameters[0]
        assert row["posterior"].shape == params.shape
        assert torch.allclose(row["posterior"], params, atol=1e-5), (index, seed)
        assert torch.equal(row["time_ids"], image["time_ids"])
        flips.add(cached.variant(index, seed)[3])
    assert flips == {False, True}
    # the sampler's buckets come from the entry (the sizes its key was made with), not from the image-facts
    # index a second time: with the index and the images' stats out of reach they are still the right ones
    from sdcluster.data import loader

    buckets = buckets_of(cfg)
    expected = [[b.size for b in buckets].index(bucket) for _, _, bucket in IMAGES]
    assert loader.bucket_ids(cfg, dataset) == expected  # from the images (the uncached path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sdcluster.data.file_facts.facts_of", lambda *a: pytest.fail("facts read again"))
        assert loader.bucket_ids(cfg, dataset, cached) == expected
    no_buckets = make_cfg([f"model={model}", "data=imagefolder", f"data.path={folder}"])
    other = latent_build.make_plan(no_buckets, dataset, comps)
    assert other is None or other.key != latent_build.make_plan(cfg, dataset, comps).key


@pytest.mark.slow
def test_sdxl_bucket_conditioning_is_what_the_pipeline_samples_with(make_cfg, tmp_path):
    """At a bucket's size, the ``add_time_ids`` a training batch gets are the pipeline's own for that
    original size, crop and target size (the numbers written out by hand above)."""
    from diffusers import StableDiffusionXLPipeline

    from sdcluster.data.buckets import buckets_of
    from sdcluster.data.dataset import TrainImages, collate, load_captioned_images
    from sdcluster.models.load import load_components
    from sdcluster.train.loss import conditioning

    folder = make_bucket_folder(tmp_path / "data")
    cfg = make_cfg([*TINY, "model=tiny_sdxl", "data=imagefolder", f"data.path={folder}"])
    comps = load_components(cfg.model, cfg.cache_root)
    rows = load_captioned_images(folder)
    examples = TrainImages(rows, comps.family.tokenizers(comps), 64, True, False, buckets=buckets_of(cfg))
    pipe = StableDiffusionXLPipeline.from_pretrained(comps.source, use_safetensors=True)
    projection = pipe.text_encoder_2.config.projection_dim
    for index, original, crop, target in [
        (1, (150, 260), (0, 2), (48, 80)),
        (3, (300, 90), (40, 0), (80, 48)),
    ]:
        with torch.no_grad():
            cond = conditioning(comps, collate([examples[(index, 0)]]), "cpu")
        want = pipe._get_add_time_ids(original, crop, target, torch.float32, projection)
        torch.testing.assert_close(cond["added_cond_kwargs"]["time_ids"], want, rtol=0, atol=0)


def test_data_validate_reports_the_bucket_histogram(tmp_path, capsys):
    from sdcluster.data.__main__ import main

    folder = make_bucket_folder(tmp_path / "data")
    assert main(["validate", str(folder), "--buckets", "64", "--bucket-step", "16", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "OK: 5 images" in out
    assert "buckets: 3 sizes, 5 images" in out
    lines = {line.split("(")[0].strip(): line for line in out.splitlines() if "aspect" in line}
    assert set(lines) == {"48x80", "64x64", "80x48"}
    assert "2 images" in lines["48x80"] and "2 images" in lines["80x48"]
    assert "1 images (fewer than a batch of 2" in lines["64x64"]
    assert main(["validate", str(folder)]) == 0
    assert "buckets" not in capsys.readouterr().out, "no histogram when buckets are off"


@pytest.mark.slow
def test_a_bucketed_entry_built_by_two_ranks_reads_as_one_built_alone(make_cfg, tmp_path):
    """Each rank writes its share of every bucket's array (center crops without flips: the square bucket's
    one row leaves rank 0 an empty shard); the entry verifies and, memory-mapped, gives the rows a
    one-process build gives."""
    import numpy as np

    from sdcluster.data import latent_build, latent_cache
    from sdcluster.data.dataset import load_captioned_images
    from sdcluster.models.load import load_components

    folder = make_bucket_folder(tmp_path / "data", suffix=" two ranks")
    crops = ["train.center_crop=true", "train.random_flip=false"]
    cfg = make_cfg([*TINY, *crops, "data=imagefolder", f"data.path={folder}"])
    comps = load_components(cfg.model, cfg.cache_root)
    dataset = load_captioned_images(folder)
    plan = latent_cache.make_plan(cfg, dataset, comps)
    assert plan is not None and len(plan.variants) == len(IMAGES)
    entries = {}
    for world in (1, 2):
        tmp, entry = tmp_path / f"build{world}", tmp_path / f"entry{world}"
        tmp.mkdir()
        for rank in range(world):
            latent_build.encode_share(plan, dataset, comps, 64, torch.device("cpu"), rank, world, tmp)
        latent_cache.commit(tmp, entry, latent_cache.entry_manifest(plan, world))
        assert latent_cache.verify(entry, plan.key, latent_cache.CACHE_VERSION) is None
        entries[world] = latent_cache.CachedExamples(entry, 0, 64, True, False)  # budget 0: memory-mapped
    assert np.load(tmp_path / "entry2" / "posterior.64x64.0.npy").shape[0] == 0
    assert np.load(tmp_path / "entry2" / "posterior.64x64.1.npy").shape[0] == 1
    arrays = plan.posterior_arrays()
    for row, variant in enumerate(plan.variants):  # each variant read where the plan put it, bucket by bucket
        name, first, _ = next(a for a in arrays if a[1] <= row < a[2])
        assert entries[2].row_of(variant) == (name, row - first)
    with pytest.raises(KeyError):
        entries[2].row_of((0, 1, 1, True))  # a crop and flip this entry does not hold
    for index, seed in itertools.product(range(len(IMAGES)), range(2)):
        one, two = entries[1][(index, seed)], entries[2][(index, seed)]
        assert torch.allclose(one["posterior"], two["posterior"], atol=1e-5), (index, seed)
        assert torch.equal(one["time_ids"], two["time_ids"])


@pytest.mark.parametrize(("accumulate", "steps"), [(1, 6), (2, 3), (4, 2)])
def test_epochs_with_buckets_count_the_samplers_topped_up_batches(make_cfg, tmp_path, accumulate, steps):
    """``train.epochs`` with buckets: an epoch is the sampler's, every bucket's last batch topped up (the
    tall, the wide and the square bucket a batch each of 4: 3 micro-steps, where 5 images / 4 gives 2), so
    the run by epochs reads every image each epoch."""
    from sdcluster.data.epochs import resolve_length
    from sdcluster.data.loader import bucket_ids, training_rows
    from sdcluster.data.sampler import BucketSampler

    folder = make_bucket_folder(tmp_path / "data")
    overrides = ["data=imagefolder", f"data.path={folder}", "data.holdout=0", "train.batch_size=4"]
    cfg = make_cfg([*TINY, *overrides, "train.epochs=2", f"train.grad_accum={accumulate}"])
    sampler = BucketSampler(bucket_ids(cfg, training_rows(cfg)), 4, 1, 0, cfg.train.seed)
    assert sampler.steps_per_epoch == 3
    assert {i for _, batch in sampler.epoch_batches(0) for i in batch} == set(range(len(IMAGES)))
    assert resolve_length(cfg).train.max_steps == steps  # ceil(2 epochs x 3 micro-steps / accumulation)
