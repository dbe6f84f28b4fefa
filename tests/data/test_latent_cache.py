"""The latent cache: same training as encoding every step, content-addressed, reused, self-healing."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sdcluster.data import latent_build, latent_cache
from sdcluster.data.dataset import TrainImages, augment, load_captioned_images, resized_size
from sdcluster.data.latent_cache import CachedExamples, verify
from sdcluster.train.loop import train
from tests.conftest import copy_sample

FAST = ["train.log_every=1", "train.checkpoint_every=100", "train.batch_size=2", "train.max_steps=4"]
ONE_PROCESS = SimpleNamespace(
    num_processes=1,
    process_index=0,
    is_main_process=True,
    device=torch.device("cpu"),
    wait_for_everyone=lambda: None,
)


def _copy_sample(dest: Path, count: int = 3, caption_suffix: str = "") -> Path:
    """The first ``count`` sample images with their captions (plus a suffix, to get a fresh cache key)."""
    return copy_sample(dest, count, lambda row: {**row, "text": row["text"] + caption_suffix})


@pytest.fixture
def comps(make_cfg):
    from sdcluster.models.load import load_components

    cfg = make_cfg()
    return load_components(cfg.model, cfg.cache_root)


def _open(cfg, comps) -> CachedExamples | None:
    dataset = load_captioned_images(cfg.data.path, cfg.data.caption_column)
    return latent_build.open_or_build(cfg, dataset, comps, ONE_PROCESS)


def _capture(caplog: pytest.LogCaptureFixture) -> None:
    """The job's logging setup stops ``sdcluster`` records at its own handler; listen there too."""
    logging.getLogger("sdcluster").addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="sdcluster")


@pytest.mark.slow
def test_training_from_cache_matches_encoding_every_step(make_cfg, tmp_path):
    """Same seed, same loss curve: in RAM and memory-mapped bitwise alike, vs. no cache within rounding."""
    base = [*FAST, "train.use_ema=true", "train.noise_offset=0.05"]
    plain = train(make_cfg([*base, "data.cache=false", f"output_root={tmp_path / 'plain'}"]))
    in_ram = train(make_cfg([*base, f"output_root={tmp_path / 'ram'}"]))
    on_disk = train(make_cfg([*base, "data.cache_memory_mb=0", f"output_root={tmp_path / 'disk'}"]))
    assert in_ram.losses == on_disk.losses
    steps = [s for s, _ in plain.losses]
    assert steps == [s for s, _ in in_ram.losses] == [1, 2, 3, 4]
    expected = [loss for _, loss in plain.losses]
    assert np.allclose([loss for _, loss in in_ram.losses], expected, rtol=1e-5, atol=0)


@pytest.mark.slow
def test_disk_path_reads_what_ram_path_holds(make_cfg, comps):
    cfg = make_cfg()
    ram = _open(cfg, comps)
    disk = CachedExamples(ram.entry, 0, cfg.train.resolution, cfg.train.center_crop, cfg.train.random_flip)
    assert ram.in_memory and not disk.in_memory
    for key in [(i, seed) for i in range(len(ram)) for seed in range(3)]:
        a, b = ram[key], disk[key]
        assert torch.equal(a["posterior"], b["posterior"]) and torch.equal(a["text"], b["text"])


@pytest.mark.parametrize("model", ["tiny", "tiny_sdxl"])
def test_cached_rows_are_the_encoded_augmented_crops_in_both_orientations(make_cfg, model):
    """The key picks the variant ``augment`` would make; both flips occur; each row is that crop encoded,
    with the conditioning the image path computes: SDXL's two encoders' states, pooled embedding and size
    and crop numbers (the crop's left edge measured in the mirrored image when mirrored)."""
    from sdcluster.models.load import load_components
    from sdcluster.train.loss import conditioning

    cfg = make_cfg([f"model={model}"])
    comps = load_components(cfg.model, cfg.cache_root)
    examples = _open(cfg, comps)
    dataset = load_captioned_images(cfg.data.path)
    images = TrainImages(dataset, comps.family.tokenizers(comps), cfg.train.resolution, False, True)
    seeds = range(40)
    assert {examples.variant(1, seed)[3] for seed in seeds} == {False, True}
    assert len({examples.variant(1, seed)[1:3] for seed in seeds}) > 1, "random crops must vary"
    res = cfg.train.resolution
    width, height = dataset[1]["image"].size
    for seed in (0, 1, 2, 3, *[s for s in seeds if examples.variant(1, s)[3]][:2]):
        pixels = augment(dataset[1]["image"], res, False, True, seed)
        cached, image = examples[(1, seed)], images[(1, seed)]
        with torch.no_grad():
            params = comps.vae.encode(pixels[None]).latent_dist.parameters[0]
            want = conditioning(comps, {k: v[None] for k, v in image.items()}, "cpu")
            got = conditioning(comps, {k: v[None] for k, v in cached.items()}, "cpu")
        assert torch.allclose(cached["posterior"], params, atol=1e-5)
        assert torch.allclose(got["encoder_hidden_states"], want["encoder_hidden_states"], atol=1e-5)
        assert torch.equal(cached["time_ids"], image["time_ids"])
        _, left, top, flip = examples.variant(1, seed)
        resized_width = resized_size((width, height), res)[0]
        assert image["time_ids"][3] == (resized_width - res - left if flip else left)
        assert image["time_ids"].tolist()[:3] + image["time_ids"].tolist()[4:] == [
            height,
            width,
            top,
            res,
            res,
        ]
        if model == "tiny_sdxl":
            added, cached_added = want["added_cond_kwargs"], got["added_cond_kwargs"]
            assert torch.allclose(cached_added["text_embeds"], added["text_embeds"], atol=1e-5)
            assert torch.equal(cached_added["time_ids"], added["time_ids"])
        else:
            assert "added_cond_kwargs" not in got


def test_key_follows_captions_image_bytes_and_resolution(make_cfg, comps, tmp_path):
    folder = _copy_sample(tmp_path / "data")

    def key(overrides: list[str] | None = None) -> str:
        cfg = make_cfg([f"data.path={folder}", *(overrides or [])])
        return latent_cache.make_plan(cfg, load_captioned_images(folder), comps).key

    first = key()
    assert key(["optim.lr=3e-4", "train.seed=7"]) == first, "sweep points over the optimizer share the cache"
    assert key(["train.resolution=32"]) != first
    assert key(["train.random_flip=false"]) != first
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    rows[0]["text"] += " Changed."
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    captioned = key()
    assert captioned != first
    image = Image.open(folder / rows[1]["file_name"]).convert("RGB")
    image.putpixel((0, 0), (1, 2, 3))
    image.save(folder / rows[1]["file_name"], format="PNG")  # same name and size, other bytes
    assert key() not in (first, captioned)


@pytest.mark.slow
def test_second_run_and_sweep_point_reuse_without_rebuilding(make_cfg, tmp_path, monkeypatch):
    folder = _copy_sample(tmp_path / "data", caption_suffix=f" {tmp_path.name}")
    builds = []
    real = latent_build.encode_share
    monkeypatch.setattr(latent_build, "encode_share", lambda *a, **k: builds.append(1) or real(*a, **k))
    common = [*FAST, "train.max_steps=1", "data=imagefolder", f"data.path={folder}"]
    train(make_cfg([*common, f"output_root={tmp_path / 'a'}"]))
    assert len(builds) == 1
    train(make_cfg([*common, f"output_root={tmp_path / 'b'}", "optim.lr=5e-4"]))
    assert len(builds) == 1


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flip-a-byte", "truncate", "no-manifest"])
def test_corrupt_entry_is_rebuilt_with_a_warning(make_cfg, comps, tmp_path, caplog, damage):
    folder = _copy_sample(tmp_path / "data", count=2, caption_suffix=f" {damage}")
    cfg = make_cfg(["data=imagefolder", f"data.path={folder}"])
    clean = _open(cfg, comps)
    expected = [clean[(i, s)]["posterior"].clone() for i in range(2) for s in range(4)]
    target = clean.entry / "posterior.0.npy"
    if damage == "flip-a-byte":
        data = bytearray(target.read_bytes())
        data[-5] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-64])
    else:
        (clean.entry / "manifest.json").unlink()
    assert verify(
        clean.entry,
        latent_cache.make_plan(cfg, load_captioned_images(folder), comps).key,
        latent_cache.CACHE_VERSION,
    )
    _capture(caplog)
    rebuilt = _open(cfg, comps)
    assert any("unusable" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert verify(rebuilt.entry, rebuilt.entry.name, latent_cache.CACHE_VERSION) is None
    got = [rebuilt[(i, s)]["posterior"] for i in range(2) for s in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


@pytest.mark.slow
def test_shards_of_two_ranks_hold_what_one_rank_encodes(make_cfg, comps, tmp_path):
    """Each rank encodes its block, rank 0 commits: the rows equal a single-process build."""
    folder = _copy_sample(tmp_path / "data", count=3, caption_suffix=" sharded")
    cfg = make_cfg(["data=imagefolder", f"data.path={folder}"])
    dataset = load_captioned_images(folder)
    plan = latent_cache.make_plan(cfg, dataset, comps)
    single = _open(cfg, comps)
    tmp = tmp_path / "two-ranks"
    tmp.mkdir()
    for rank in (0, 1):
        latent_build.encode_share(plan, dataset, comps, cfg.train.resolution, "cpu", rank, 2, tmp)
    from sdcluster.data.latent_cache import commit

    commit(tmp, tmp_path / "entry", latent_cache.entry_manifest(plan, 2))
    sharded = CachedExamples(tmp_path / "entry", 0, cfg.train.resolution, False, True)
    assert len(np.load(tmp_path / "entry" / "posterior.1.npy")) > 0
    for key in [(i, s) for i in range(3) for s in range(6)]:
        assert torch.allclose(sharded[key]["posterior"], single[key]["posterior"], atol=1e-5)
        assert torch.allclose(sharded[key]["text"], single[key]["text"], atol=1e-5)


def test_too_many_random_crops_falls_back_to_encoding(make_cfg, comps, tmp_path, caplog):
    folder = tmp_path / "wide"
    folder.mkdir()
    for i in range(2):  # 200x100 at 64 px: 128x64 after resizing, 65 distinct crops each
        Image.fromarray(np.full((100, 200, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text(
        "".join(f'{{"file_name": "{i}.png", "text": "x"}}\n' for i in range(2))
    )
    cfg = make_cfg(["data=imagefolder", f"data.path={folder}"])
    _capture(caplog)
    from sdcluster.data.loader import training_examples

    assert isinstance(training_examples(cfg, comps, ONE_PROCESS), TrainImages)
    assert any("latent cache off" in r.getMessage() for r in caplog.records)
    cfg = make_cfg(["data=imagefolder", f"data.path={folder}", "train.center_crop=true"])
    assert isinstance(training_examples(cfg, comps, ONE_PROCESS), CachedExamples)


_JOB = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s", force=True)
from tests.conftest import compose
from sdcluster.train.loop import train
train(compose(sys.argv[1:]))
print("job done", file=sys.stderr, flush=True)
"""


@pytest.mark.slow
def test_a_job_waits_for_the_job_building_its_entry_instead_of_encoding_again(make_cfg, comps, tmp_path):
    """Sweep points start together: the second finds the entry locked, waits, and reuses the first's entry."""
    import fcntl
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.slurm_helpers import wait_for_line

    folder = _copy_sample(tmp_path / "data", count=2, caption_suffix=" locked")
    overrides = [*FAST, "train.max_steps=1", "data=imagefolder", f"data.path={folder}"]
    cfg = make_cfg(overrides)
    dataset = load_captioned_images(cfg.data.path, cfg.data.caption_column)
    plan = latent_cache.make_plan(cfg, dataset, comps)
    entry = Path(cfg.cache_root) / "latents" / plan.key
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".{entry.name}.lock", "a") as lock:  # this test is "the first job"
        fcntl.flock(lock, fcntl.LOCK_EX)
        roots = [
            f"output_root={tmp_path / 'job'}",
            f"jobs_root={tmp_path / 'jobs'}",
            f"cache_root={cfg.cache_root}",
        ]
        log = tmp_path / "job.err"
        with log.open("w") as err:
            job = subprocess.Popen([sys.executable, "-c", _JOB, *overrides, *roots], cwd=REPO, stderr=err)
        # The job cannot finish while we hold the lock; a deadline makes a job that never waits a failure.
        line = wait_for_line(log, "another job is building", timeout_s=300)
        assert "waiting for it" in line, log.read_text()[-3000:]
        latent_build._build(cfg, plan, dataset, comps, ONE_PROCESS, entry, latent_cache.MISSING)
    code = job.wait(timeout=300)
    rest = log.read_text()
    assert code == 0, rest[-3000:]
    assert "job done" in rest
    assert "encoding rows" not in rest, "the waiting job encoded the dataset again"
    assert f"latent cache: {entry}" in rest
    assert verify(entry, plan.key, latent_cache.CACHE_VERSION) is None
    assert not list(entry.parent.glob(f".tmp-{entry.name}-*")), "a build folder was left behind"


def test_a_start_on_a_built_entry_reads_no_image_and_no_entry_byte(make_cfg, comps, tmp_path, monkeypatch):
    """What makes a job's start flat in the number of images: the images' sha256 and headers come from the
    facts index (a stat each), a memory-mapped entry's files are checked by size; an image changed since
    is read again, and changes the key."""
    from PIL import Image as PILImage

    from sdcluster import sealed
    from sdcluster.data import file_facts

    folder = _copy_sample(tmp_path / "data", count=3, caption_suffix=" facts")
    cfg = make_cfg(["data=imagefolder", f"data.path={folder}", "data.cache_memory_mb=0"])
    built = _open(cfg, comps)
    assert file_facts.index_file(cfg.cache_root, folder).is_file()
    hashed, opened = [], []
    real_hash, real_open = sealed.file_sha256, PILImage.open
    monkeypatch.setattr(sealed, "file_sha256", lambda p: hashed.append(p) or real_hash(p))
    monkeypatch.setattr(file_facts.atomic, "file_sha256", lambda p: hashed.append(p) or real_hash(p))
    monkeypatch.setattr(PILImage, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    again = _open(cfg, comps)
    assert again.entry == built.entry and not again.in_memory
    assert hashed == [] and opened == []
    first = folder / json.loads((folder / "metadata.jsonl").read_text().splitlines()[0])["file_name"]
    PILImage.new("RGB", (70, 64), "red").save(first)  # another image under the same name
    changed = _open(cfg, comps)
    assert [Path(p).name for p in hashed if Path(p).parent == folder] == [first.name]
    assert changed.entry != built.entry


def test_the_vae_encodes_as_many_pixels_per_call_as_8_images_of_512_px() -> None:
    """8 images of 1024 px in one float32 VAE call held 24 GiB on a GPU: the build keeps the pixels per call
    of 8 at 512 px, from 8 images at 512 px and below down to 1 at 1448 px and above."""
    from sdcluster.data.latent_build import encode_batch

    assert [encode_batch(r) for r in (64, 512, 768, 1024, 1448, 2048)] == [8, 8, 3, 2, 1, 1]
