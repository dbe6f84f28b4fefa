"""Several sources (``data.sources``): one identity over all of them, every source checked by name, repeats
in the sampler's epoch (not in the cache), a holdout per source, exact resume, a generation folder as one."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from sdcluster import identity
from sdcluster.cluster.preflight import preflight
from sdcluster.config import ConfigError
from sdcluster.data import __main__ as data_cli
from sdcluster.data.loader import training_rows
from sdcluster.data.sampler import BucketSampler, StepSampler
from sdcluster.data.sources import (
    check_sources,
    image_files,
    load_rows,
    repeats_of,
    split_rows,
    stage_sources_for_launch,
    stream_rows,
    training_size,
)
from sdcluster.data.split import holdout_split
from tests.conftest import copy_sample
from tests.data.test_hub_datasets import COMMIT, NEWER, PARQUET_ID, hub  # noqa: F401 (hub: the fixture)


def _edit(folder: Path, row) -> None:
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row(json.loads(x))) + "\n" for x in lines))


def _sources(*entries: str) -> list[str]:
    """``data=sources`` with these list entries (``{path: ..., repeats: ...}``)."""
    return ["data=sources", f"data.sources=[{', '.join(entries)}]"]


@pytest.fixture
def two(tmp_path: Path) -> tuple[Path, Path]:
    """A product set of 3 sample images and a regularisation set of 5 (its captions under ``caption``)."""
    product = copy_sample(tmp_path / "product", 3, lambda r: {**r, "text": r["text"] + " sks"})
    reg = copy_sample(tmp_path / "reg", 5, lambda r: {"file_name": r["file_name"], "caption": r["text"]})
    return product, reg


def _two(two, repeats: int = 2, extra: str = "") -> list[str]:
    product, reg = two
    return _sources(
        f"{{name: product, path: {product}, repeats: {repeats}{extra}}}",
        f"{{name: reg, path: {reg}, caption_column: caption}}",
    )


# --- identity -----------------------------------------------------------------------------------------------


def test_identity_is_stable_over_copies_and_sensitive_to_what_is_trained(make_cfg, two, tmp_path):
    product, reg = two
    base = identity.run_hash(make_cfg(_two(two)))
    assert base == identity.run_hash(make_cfg(_two(two))), "the same sources name the same run"
    moved = copy_sample(tmp_path / "elsewhere", 3, lambda r: {**r, "text": r["text"] + " sks"})
    same_contents = _sources(
        f"{{name: another label, path: {moved}, repeats: 2}}",
        f"{{name: reg, path: {reg}, caption_column: caption}}",
    )
    assert identity.run_hash(make_cfg(same_contents)) == base, "a folder is its contents, not its path"
    changed = {
        "repeats": _two(two, repeats=3),
        "holdout": _two(two, extra=", holdout: 1"),
        "order": _sources(
            f"{{name: reg, path: {reg}, caption_column: caption}}",
            f"{{name: product, path: {product}, repeats: 2}}",
        ),
        "one source less": _sources(f"{{name: product, path: {product}, repeats: 2}}"),
    }
    hashes = {what: identity.run_hash(make_cfg(overrides)) for what, overrides in changed.items()}
    assert base not in hashes.values() and len(set(hashes.values())) == len(hashes), hashes
    _edit(product, lambda r: {**r, "text": r["text"] + " edited"})  # a caption changed: other data
    assert identity.run_hash(make_cfg(_two(two))) != base


def test_configs_without_sources_keep_their_identity(make_cfg, two):
    """A single folder is read as one source internally, but hashed as it always was (the pinned hashes in
    tests/config check the values; here: no trace of sources in what is hashed)."""
    cfg = make_cfg(["data=imagefolder", f"data.path={two[0]}"])
    assert "sources" not in identity.semantic_train_config(cfg)["data"]
    assert cfg.data.sources == []


# --- checks -------------------------------------------------------------------------------------------------


def test_every_problem_names_its_source_before_anything_is_queued(make_cfg, two, tmp_path, capsys):
    product, reg = two
    with pytest.raises(ConfigError, match=r"data\.sources\[1\] \(reg\)\.repeats: must be >= 1, got 0"):
        make_cfg(_sources(f"{{path: {product}}}", f"{{name: reg, path: {reg}, repeats: 0}}"))
    missing = _sources(f"{{path: {product}}}", f"{{name: gone, path: {tmp_path / 'nowhere'}}}")
    with pytest.raises(ConfigError, match=r"data\.sources\[1\] \(gone\): .*is not a folder"):
        check_sources(make_cfg(missing))
    no_column = _sources(f"{{name: product, path: {product}}}", f"{{name: reg, path: {reg}}}")  # not "text"
    with pytest.raises(
        ConfigError,
        match=r"(?s)the first in data\.sources\[1\] \(reg\).*no \"text\" key.*caption_column: KEY",
    ):
        preflight(make_cfg(["task=train", *no_column]), dry_run=True)
    held = _two(two, extra=", holdout: 3")
    with pytest.raises(ConfigError, match=r"data\.sources\[0\] \(product\): holdout=3 leaves nothing"):
        check_sources(make_cfg(held))
    check_sources(make_cfg(_two(two)))  # both fine
    with pytest.raises(ConfigError, match=r"data\.path: is not read when data\.sources is set.*\{path: "):
        make_cfg([*_two(two), f"data.path={product}"])  # silently unused before: now named, with the fix

    assert data_cli.main(["validate", *no_column]) == 1
    out = capsys.readouterr().out
    assert """data.sources[1] (reg): metadata.jsonl line 1: '11 (1).JPG': no "text" key""" in out
    assert "data.sources[0]" not in out, "the good source has no problem"
    assert data_cli.main(["validate", *_two(two)]) == 0
    assert "data.sources[0] (product): 3 images x 2 repeats" in capsys.readouterr().out


def test_validate_names_the_hub_datasets_it_cannot_check_here(two, tmp_path, monkeypatch, capsys):
    """A hub dataset is checked when launch stages it: ``data validate`` says so and checks the rest (an
    unstaged hub source's empty path is not the working directory, whose files it used to scan)."""
    product, _ = two
    monkeypatch.chdir(copy_sample(tmp_path / "here", 2))
    assert data_cli.main(["validate", "data=hub", "data.name=someone/jeans"]) == 2
    assert "data.name=someone/jeans: no folder here to check; launch stages" in capsys.readouterr().err
    mixed = _sources(f"{{name: product, path: {product}}}", "{hub: true, name: someone/jeans}")
    assert data_cli.main(["validate", *mixed]) == 0
    out = capsys.readouterr().out
    assert "not checked: data.sources[1] (someone/jeans): launch stages a hub dataset" in out
    assert "OK: data.sources[0] (product): 3 images x 1 repeats" in out
    assert "OK: data.sources[1]" not in out


# --- repeats, holdout ---------------------------------------------------------------------------------------


def test_repeats_list_a_row_that_many_times_an_epoch_and_train_epochs_counts_them(make_cfg, two):
    cfg = make_cfg(_two(two, repeats=3))
    rows = training_rows(cfg)
    assert len(rows) == 8, "each image is one row: repeats do not copy rows"
    repeats = repeats_of(cfg, rows)
    assert repeats == [3, 3, 3, 1, 1, 1, 1, 1]
    stream = stream_rows(repeats)
    assert training_size(cfg) == len(stream) == 14
    for world in (1, 2):
        samplers = [StepSampler(14, 1, world, r, seed=5, rows=stream) for r in range(world)]
        for epoch in range(3):
            steps = range(epoch * 14 // world, (epoch + 1) * 14 // world)
            read = Counter(s.key(p)[0] for s in samplers for step in steps for p in s.positions(step))
            assert read == {row: times for row, times in enumerate(repeats)}, (world, epoch)
    one = StepSampler(14, 2, 1, 0, seed=5, rows=stream)
    again = StepSampler(14, 2, 1, 0, seed=5, rows=stream, start_micro_step=4)
    assert [one.key(p) for p in range(8, 20)] == [again.key(p) for p in range(8, 20)], "resumes mid-epoch"
    bucket_of = [row % 2 for row in stream]  # two buckets, by stream item
    buckets = BucketSampler(bucket_of, 2, 1, 0, seed=5, rows=stream)
    keys = [buckets.key(p)[0] for p in range(2 * buckets.steps_per_epoch)]
    assert Counter(keys)[0] >= 3 and set(keys) == set(range(8))
    assert all(len({k % 2 for k in keys[i : i + 2]}) == 1 for i in range(0, len(keys), 2)), (
        "one bucket a batch"
    )

    epochs = make_cfg([*_two(two, repeats=3), "train.epochs=2", "train.batch_size=2"])
    from sdcluster.data.epochs import resolve_length

    assert resolve_length(epochs).train.max_steps == 14  # 2 epochs of 14 examples, 2 a step


def test_the_holdout_is_drawn_per_source(make_cfg, two):
    cfg = make_cfg([*_two(two, extra=", holdout: 1"), "data.holdout=2"])  # product 1 of 3, reg 2 of 5
    table = load_rows(cfg)
    train, held = split_rows(cfg.data, [3, 5])
    assert held == holdout_split(3, 1)[1] + [3 + i for i in holdout_split(5, 2)[1]]
    names = list(table["file_name"])
    rows = training_rows(cfg)
    assert [(s, n) for s, n in zip(rows["source"], rows["file_name"], strict=True)] == [
        (0 if i < 3 else 1, names[i]) for i in train
    ]
    assert len(train) == 5 and not set(train) & set(held)
    assert all(path.is_file() for path in image_files(cfg, rows))
    from sdcluster.models.load import load_components
    from sdcluster.train.validation import loss_images

    comps = load_components(cfg.model, cfg.cache_root)
    loss = loss_images(cfg, comps.family.tokenizers(comps))
    assert loss.held_out and loss.indices == held and loss.names == [names[i] for i in held]
    assert training_size(make_cfg([*_two(two, extra=", holdout: 1"), "data.holdout=2"])) == 2 * 2 + 3


# --- training -----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["cache", "images", "buckets"])
def test_two_sources_train_and_resume_mid_epoch_bitwise(make_cfg, two, tmp_path, caplog, variant):
    """3 product images read twice and 5 regularisation images once: 11 examples an epoch, 6 micro-steps at
    a batch of 2, so a stop at step 3 is inside the first epoch; the cache holds each image once. With
    buckets the product set is 5 images of 3 aspect ratios (15 examples, one bucket a batch)."""
    from sdcluster.runtime.step_events import stop_at
    from sdcluster.train.loop import train
    from tests.data.test_buckets import TINY, make_bucket_folder
    from tests.train.test_loop import FAST, _assert_bitwise_equal, _final_weights

    logging.getLogger("sdcluster").addHandler(caplog.handler)  # the job's logging stops at its handler
    caplog.set_level(logging.INFO, logger="sdcluster")
    _edit(two[0], lambda r: {**r, "text": r["text"] + f" resume {variant}"})  # a cache entry of its own
    images, examples, extra = 8, 11, []
    if variant == "buckets":
        two = (make_bucket_folder(tmp_path / "shapes", suffix=" resume buckets"), two[1])
        images, examples, extra = 10, 15, TINY
    cache = "false" if variant == "images" else "true"
    overrides = [
        *FAST,
        *_two(two),
        *extra,
        f"data.cache={cache}",
        "train.max_steps=8",
        "optim.lr_schedule=cosine",
    ]
    straight = train(make_cfg([*overrides, f"output_root={tmp_path / 'a'}"]))
    assert f"data: {images} images ({examples} examples an epoch), epoch 0" in caplog.text
    if cache == "true":
        assert f"crop/flip variants of {images} images" in caplog.text, "each image cached once"
    if variant == "buckets":
        assert "data.buckets: 48x80: 5, 64x64: 4, 80x48: 6 images per bucket" in caplog.text

    cfg = make_cfg([*overrides, f"output_root={tmp_path / 'b'}"])
    with stop_at(lambda step: step == 3):
        first = train(cfg)
    assert first.interrupted and first.step == 3
    second = train(cfg)
    assert not second.interrupted and second.step == 8
    _assert_bitwise_equal(_final_weights(straight.run_dir), _final_weights(second.run_dir))
    assert second.losses == [pair for pair in straight.losses if pair[0] > 3]


def test_a_generation_folder_is_a_source(make_cfg, two, tiny_model, tmp_path):
    """What ``task=generate`` writes (images, ``metadata.jsonl`` with the prompts as ``text``, a contact
    sheet named as not data) is an imagefolder: it passes the checks and its images are rows."""
    from sdcluster.generate.job import generate_images
    from tests.generate.conftest import program_cfg, write_program

    program = write_program(
        tmp_path, "templates:\n  - text: 'a pair of {wash} jeans'\nslots:\n  wash: [light, dark]\n"
    )
    made = generate_images(program_cfg(tmp_path / "gen", tiny_model, program)).out_dir
    assert (made / "metadata.jsonl").is_file()
    cfg = make_cfg(
        _sources(f"{{name: product, path: {two[0]}, repeats: 2}}", f"{{name: generated, path: {made}}}")
    )
    check_sources(cfg)
    rows = training_rows(cfg)
    generated = [t for s, t in zip(rows["source"], rows["text"], strict=True) if s == 1]
    assert sorted(generated) == ["a pair of dark jeans", "a pair of light jeans"]
    assert training_size(cfg) == 3 * 2 + 2


def test_hub_sources_are_staged_at_launch_like_data_hub(hub, make_cfg, two, tmp_path):  # noqa: F811
    """A hub source is pinned and staged by the same call as ``data=hub``, one per source, then read as its
    staged folder; its commit, not where it was staged, is in the run's identity."""
    hub_source = f"{{hub: true, name: {PARQUET_ID}, caption_column: caption}}"
    overrides = [*_sources(f"{{name: product, path: {two[0]}, repeats: 2}}", hub_source)]
    cfg = make_cfg(["task=train", *overrides, f"data.cache_dir={tmp_path / 'hf'}"])
    submitted, unchecked = preflight(cfg, dry_run=True)
    assert submitted.data.sources[1].commit == COMMIT and cfg.data.sources[1].commit is None
    assert any(f"data.sources[1] ({PARQUET_ID})" in line for line in unchecked), "not downloaded: said so"
    assert hub.downloaded() == {"README.md"}

    staged = stage_sources_for_launch(cfg, say=lambda _: None)
    assert Path(staged.data.sources[1].path).is_relative_to(tmp_path / "hf")
    check_sources(staged)
    rows = training_rows(staged)
    assert list(rows["source"]) == [0] * 3 + [1] * 6 and training_size(staged) == 3 * 2 + 6
    moved = dataclasses.replace(staged.data.sources[1], path="/elsewhere")
    newer = dataclasses.replace(staged.data.sources[1], commit=NEWER)

    def with_source(source):
        return dataclasses.replace(
            staged, data=dataclasses.replace(staged.data, sources=[staged.data.sources[0], source])
        )

    assert identity.run_hash(with_source(moved)) == identity.run_hash(staged)
    assert identity.run_hash(with_source(newer)) != identity.run_hash(staged)


def test_a_launch_decodes_only_the_images_new_or_changed_since_its_last_clean_check(make_cfg, tmp_path):
    """A launch that submits remembers which file versions decoded cleanly (size and modification time, the
    test make and rsync use) and the next launch decodes only the others, for one folder and for sources; a
    dry run reads that memo but writes nothing; ``data validate DIR`` decodes every image; another
    ``data.max_pixels`` decodes everything again."""
    import os

    from sdcluster.cluster.preflight import check_data
    from sdcluster.data.file_facts import DecodedMemo
    from sdcluster.data.metadata import validate
    from sdcluster.data.sources import source_problems

    folder = copy_sample(tmp_path / "data")
    one = make_cfg(["data=imagefolder", f"data.path={folder}"])
    sources = make_cfg(_sources(f"{{name: all, path: {folder}}}"))
    memo = DecodedMemo(one.cache_root, folder, one.data.max_pixels).path  # this folder's (the root is shared)
    preflight(one, dry_run=True)
    assert not memo.exists()
    preflight(one, dry_run=False)  # what a launch that submits checks first
    assert memo.is_file()
    image = folder / "11 (12).png"
    stamp = image.stat()
    data = image.read_bytes()
    half = len(data) // 2
    image.write_bytes(data[:half] + bytes(len(data) - half))  # same size, its pixel data zeroed
    os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))

    check_data(one)  # the same size and time: the version that decoded cleanly
    assert source_problems(sources) == []  # the same memo: the same folder, the same limit
    assert [(p.kind, p.file_name) for p in validate(folder)] == [("unreadable", "11 (12).png")]
    other_limit = make_cfg(["data=imagefolder", f"data.path={folder}", "data.max_pixels=12345678"])
    with pytest.raises(ConfigError, match=r"11 \(12\)\.png.*cannot be decoded"):
        check_data(other_limit, remember=True)

    os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1))  # touched: decoded again, and refused
    assert [(p.kind, p.file_name) for _, p in source_problems(sources)] == [("unreadable", "11 (12).png")]
    with pytest.raises(ConfigError, match=r"11 \(12\)\.png.*cannot be decoded"):
        check_data(one, remember=True)
    image.write_bytes(data)  # mended: decoded once more, and remembered
    check_data(one, remember=True)
    image.write_bytes(data[:half] + bytes(len(data) - half))
    os.utime(image, ns=(stamp.st_atime_ns, image.stat().st_mtime_ns - 1))  # not the mended version's time
    with pytest.raises(ConfigError, match=r"cannot be decoded"):
        check_data(one)


def test_a_jobs_start_opens_only_the_images_its_launch_did_not_find_clean(make_cfg, tmp_path, monkeypatch):
    """The job checks each listed file as validate does, but the content of one its launch decoded cleanly
    and that has not changed since (same size and time) was checked then: it is not opened again. A file
    the launch did not see, or changed since, is opened (and refused when it is no image)."""
    import os

    from sdcluster.cluster.preflight import check_data
    from sdcluster.data import image_checks, loader
    from sdcluster.data.metadata import MetadataError

    folder = copy_sample(tmp_path / "data")
    cfg = make_cfg(["data=imagefolder", f"data.path={folder}"])
    check_data(cfg, remember=True)  # what a launch that submits checks first
    opened: list[str] = []
    sniff = image_checks.sniff_format
    record = lambda path: opened.append(Path(path).name) or sniff(path)  # noqa: E731
    monkeypatch.setattr(image_checks, "sniff_format", record)
    rows = loader.training_rows(cfg)
    assert opened == [] and len(rows) > 0

    image = folder / "11 (12).png"
    stamp = image.stat()
    os.utime(image, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1))  # changed since the launch
    loader.training_rows(cfg)
    assert opened == ["11 (12).png"]
    image.write_bytes(b"GIF89a" + bytes(100))  # and now no image at all: refused by the job as by validate
    with pytest.raises(MetadataError, match=r"11 \(12\)\.png.*not a JPEG, PNG, WEBP file by its content"):
        loader.training_rows(cfg)
