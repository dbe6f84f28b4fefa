"""The data a launch checked, pinned for its jobs (``data.snapshot``): a job on a complete latent cache reads
the snapshot and the cache, not the folder; a job that reads images checks each against the snapshot; a
lost snapshot falls back to the folder, said in the log, and refuses data that changed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import weakref
from pathlib import Path

import pytest
from PIL import Image

from sdcluster.cluster.preflight import preflight
from sdcluster.data import latent_array, snapshot
from sdcluster.data.file_facts import facts_of
from sdcluster.data.loader import training_rows
from sdcluster.data.sources import column, image_files, load_rows, loss_rows, split_rows
from sdcluster.paths import data_snapshot_file, datasets_cache
from sdcluster.train.loop import train
from tests.conftest import copy_sample


@pytest.fixture(autouse=True)
def _fresh_process(monkeypatch):
    """Each job is a fresh process: nothing loaded by an earlier call of this test stands in for a file."""
    monkeypatch.setattr(snapshot, "_loaded", weakref.WeakValueDictionary())


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(tmp_path: Path, count: int = 5) -> list[str]:
    """A short run on a copy of the sample whose captions name this test's folder: a latent-cache key of its
    own (the shared cache root may hold the plain sample's entry)."""
    data = copy_sample(tmp_path / "data", count, lambda r: {**r, "text": f"{r['text']} {tmp_path.name}"})
    return [f"data.path={data}", "data.holdout=1", "train.max_steps=2", "train.log_every=1"]


def test_the_launch_pins_what_it_checked_and_a_dry_run_pins_nothing(make_cfg, tmp_path):
    """The pinned file holds the rows the job's table has, with the facts of each image, and is named by the
    sha256 of its bytes; the submitted config carries the digest, the run's identity does not change."""
    from sdcluster import identity

    cfg = make_cfg(["task=train", *_run(tmp_path)])
    dry, _ = preflight(cfg, dry_run=True)
    assert dry.data.snapshot is None
    written = Path(cfg.cache_root).glob("data_snapshots/*.json")
    assert not any(str(tmp_path) in p.read_text() for p in written), "a dry run wrote a snapshot"

    pinned, _ = preflight(cfg)
    digest = pinned.data.snapshot
    file = data_snapshot_file(cfg.cache_root, digest)
    assert hashlib.sha256(file.read_bytes()).hexdigest().startswith(digest) and len(digest) == 32
    assert identity.run_hash(pinned) == identity.run_hash(cfg)

    table = load_rows(cfg, datasets_cache(cfg))
    rows = snapshot.rows(pinned)
    assert len(rows) == len(table) == 5
    assert rows["file_name"] == column(table, "file_name")
    assert rows["text"] == column(table, "text")
    facts = facts_of(image_files(cfg, table), cfg.cache_root)
    assert rows.facts() == ([f.sha256 for f in facts], [f.upright for f in facts])
    assert training_rows(pinned)["file_name"] == column(training_rows(cfg), "file_name")


def test_several_sources_are_pinned_as_the_table_reads_them(make_cfg, tmp_path):
    """Rows source after source, each source's caption column, the source column; the snapshot of the table
    the job would read is the launch's, to the digest, and so is one read afresh from the folders."""
    product = copy_sample(tmp_path / "product", 3, lambda r: {**r, "text": r["text"] + " sks"})
    reg = copy_sample(tmp_path / "reg", 4, lambda r: {"file_name": r["file_name"], "caption": r["text"]})
    sources = f"[{{path: {product}, repeats: 2}}, {{path: {reg}, caption_column: caption, holdout: 1}}]"
    cfg = make_cfg(["task=train", "data=sources", f"data.sources={sources}"])
    pinned, _ = preflight(cfg)  # the rows the check read, pinned
    table = load_rows(cfg, datasets_cache(cfg))
    assert snapshot.of_table(cfg, table).digest == pinned.data.snapshot
    assert snapshot.take(cfg).digest == pinned.data.snapshot
    rows = snapshot.rows(pinned)
    for name in ("file_name", "text", "source"):
        assert rows[name] == column(table, name)
    train, held = split_rows(cfg.data, rows.snapshot.counts)
    assert rows.snapshot.counts == [3, 4] and len(held) == 1
    assert training_rows(pinned)["source"] == column(table.select(train), "source")


def test_a_pinned_job_on_a_complete_cache_reads_only_its_held_out_images(make_cfg, tmp_path):
    """Once the cache is built, the metadata made unreadable and every training image deleted, a pinned job
    still starts, trains and validates: the snapshot and the entry are all its start reads, and it follows
    an unpinned run's losses step by step."""
    base = _run(tmp_path)
    cfg = make_cfg(base)
    plain = train(make_cfg([*base, f"output_root={tmp_path / 'plain'}"]))  # builds the cache entry
    pinned = snapshot.pin(cfg, say=lambda line: None)

    data = Path(cfg.data.path)
    held = set(loss_rows(pinned)[0].select(loss_rows(pinned)[1])["file_name"])
    assert len(held) == 1
    (data / "metadata.jsonl").write_text("this is not json\n")
    for image in data.iterdir():
        if image.name not in held and image.name != "metadata.jsonl":
            image.unlink()
    cfg = dataclasses.replace(pinned, output_root=str(tmp_path / "pinned"))
    result = train(cfg)
    assert result.step == 2
    theirs, mine = _metrics(plain.run_dir), _metrics(result.run_dir)
    assert len(mine) == len(theirs) == 3  # two steps' losses and the held-out loss
    assert [{**row, "time": 0} for row in mine] == [{**row, "time": 0} for row in theirs]


def _changed(path: Path) -> None:
    """Another image under the same name (a new file: a new stat, new bytes)."""
    with Image.open(path) as image:
        flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    tmp = path.with_name("changed.tmp.jpg")
    flipped.save(tmp)
    os.replace(tmp, path)


def test_an_image_changed_after_the_launch_stops_a_job_that_reads_it(make_cfg, tmp_path):
    """A job that encodes images (no cache, or a cache piece) checks each against the pin: one changed
    since the launch stops it with the file's name and the fix; one swapped for a symlink out of the folder
    is refused as the reader refuses it."""
    cfg = make_cfg([*_run(tmp_path), "data.cache=false"])
    pinned = snapshot.pin(cfg, say=lambda line: None)
    files = image_files(cfg, training_rows(pinned))
    _changed(files[0])
    with pytest.raises(
        snapshot.DataChangedError, match=re.escape(f"{files[0].name}: its content changed")
    ) as err:
        train(dataclasses.replace(pinned, output_root=str(tmp_path / "changed")))
    assert "launch again" in str(err.value)

    cached = dataclasses.replace(pinned, data=dataclasses.replace(pinned.data, cache=True))
    with pytest.raises(snapshot.DataChangedError, match=re.escape(files[0].name)):
        latent_array.build_piece(dataclasses.replace(cached, cache_root=cfg.cache_root), 0, 1)

    outside = tmp_path / "outside.jpg"
    files[1].rename(outside)
    files[1].symlink_to(outside)
    with pytest.raises(snapshot.DataChangedError, match=re.escape(files[1].name)):
        training_rows(pinned).table(pinned)


def test_a_lost_or_damaged_snapshot_reads_the_folder_and_refuses_changed_data(make_cfg, tmp_path, caplog):
    """Said in the log, then the folder read as before, and used only if it still holds the pinned data."""
    cfg = make_cfg(_run(tmp_path))
    pinned = snapshot.pin(cfg, say=lambda line: None)
    snapshot._loaded.clear()  # the job: a process of its own, which reads the file
    file = data_snapshot_file(cfg.cache_root, pinned.data.snapshot)
    file.write_bytes(file.read_bytes().replace(b'"counts":[5]', b'"counts":[4]'))
    with caplog.at_level(logging.WARNING, logger="sdcluster"):
        rows = snapshot.rows(pinned)
    assert "its bytes do not hash to the pinned digest" in caplog.text
    assert rows["file_name"] == column(load_rows(cfg, datasets_cache(cfg)), "file_name")

    file.unlink()
    metadata = Path(cfg.data.path) / "metadata.jsonl"
    lines = metadata.read_text().splitlines()
    metadata.write_text("\n".join(lines[:-1]) + "\n")  # an image dropped while the job waited
    snapshot._loaded.clear()
    with pytest.raises(snapshot.DataChangedError, match=r"not what the launch pinned.*Launch again"):
        training_rows(pinned)


@pytest.mark.parametrize("buckets", [False, True])
def test_epochs_are_counted_from_the_pin(make_cfg, tmp_path, buckets):
    """``train.epochs`` becomes the same ``train.max_steps`` from the pin as from the folder, and is counted
    from the pin alone (the launch reads the folder once, for its check and the pin)."""
    from sdcluster.data.epochs import resolve_length

    on = ["data.buckets.enabled=true", "data.buckets.step=16"] if buckets else []
    cfg = make_cfg([*_run(tmp_path), *on, "train.epochs=3", "train.max_steps=null", "train.batch_size=2"])
    counted = resolve_length(cfg).train.max_steps
    pinned = snapshot.pin(cfg, say=lambda line: None)
    (Path(cfg.data.path) / "metadata.jsonl").write_text("this is not json\n")
    assert resolve_length(pinned).train.max_steps == counted
    assert counted == 6 if not buckets else counted >= 6  # 4 training images x 3 epochs / 2 (topped up)


def test_a_sweeps_points_check_and_pin_their_shared_data_once(make_cfg, tmp_path, monkeypatch):
    """Points that read the same folder are checked and pinned once for all (at 100,000 images a check is
    about 10 s per point); outside a sweep's checks, every launch reads the folder afresh."""
    from sdcluster.cluster.preflight import checks_together
    from sdcluster.data import metadata

    reads: list[str] = []
    real = metadata.scan

    def counted(folder, *args, **kwargs):
        reads.append(str(folder))
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(metadata, "scan", counted)
    base = ["task=train", *_run(tmp_path)]
    with checks_together():
        pinned = [preflight(make_cfg([*base, f"optim.lr={lr}"]))[0] for lr in (1e-4, 5e-5, 2e-5)]
    assert len(reads) == 1 and len({cfg.data.snapshot for cfg in pinned}) == 1
    assert [cfg.optim.lr for cfg in pinned] == [1e-4, 5e-5, 2e-5]
    preflight(make_cfg(base))
    preflight(make_cfg(base))
    assert len(reads) == 3
