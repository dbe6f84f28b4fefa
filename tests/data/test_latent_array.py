"""task=cache: the latent cache built as an array of pieces, kept across a kill, read by training as built."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sdcluster.data import latent_array, latent_build
from sdcluster.data.latent_cache import CachedExamples, verify
from sdcluster.data.loader import training_rows
from sdcluster.models.load import load_components
from tests.conftest import REPO, copy_sample
from tests.data.test_latent_cache import ONE_PROCESS, _capture


def _cfg(make_cfg, tmp_path: Path, cache: str = "cache", extra: list[str] | None = None):
    """Five sample images (random crops: many rows per image) under a cache root of this test's own."""
    data = tmp_path / "data"
    if not data.exists():
        copy_sample(data, 5)
    return make_cfg([f"data.path={data}", f"cache_root={tmp_path / cache}", *(extra or [])])


def _entry_rows(entry: Path, cfg) -> dict:
    examples = CachedExamples(
        entry, 2**30, cfg.train.resolution, cfg.train.center_crop, cfg.train.random_flip
    )
    return {key: examples[key] for key in [(i, seed) for i in range(len(examples)) for seed in range(4)]}


def _link_model(cfg, tiny_model: Path) -> None:
    """The tiny model in this test's cache root (a link, not a build)."""
    models = Path(cfg.cache_root) / "models"
    models.mkdir(parents=True, exist_ok=True)
    if not (models / tiny_model.name).exists():
        (models / tiny_model.name).symlink_to(tiny_model)


def test_pieces_publish_one_entry_that_training_reads_as_its_own(make_cfg, tmp_path, tiny_model):
    """Three pieces, one stopped half-way and built again: the entry is published once, by the last piece,
    and holds what a training job's own build holds (same key, same rows within float rounding)."""
    cfg = _cfg(make_cfg, tmp_path)
    _link_model(cfg, tiny_model)
    first = latent_array.build_piece(cfg, 0, 3)
    assert first.encoded and not first.published and first.rows > 0
    pieces = latent_array.pieces_dir(first.entry, 3)
    assert (pieces / "piece-0" / latent_array.PIECE_MANIFEST).is_file() and not first.entry.exists()

    stopped = latent_array.build_piece(cfg, 1, 3, should_stop=lambda: True)  # the signal at its first batch
    assert stopped.interrupted and not (pieces / "piece-1").exists()
    assert sorted(p.name for p in pieces.iterdir()) == ["piece-0"]  # its partial folder is gone too

    last = latent_array.build_piece(cfg, 2, 3)
    assert not last.published
    again = latent_array.build_piece(cfg, 1, 3)  # the requeued task: the last piece, so it publishes
    assert again.encoded and again.published
    assert verify(again.entry, again.entry.name, latent_array.CACHE_VERSION) is None
    assert not pieces.exists()  # the pieces' files live on in the entry only
    manifest = json.loads((again.entry / "manifest.json").read_text())
    assert manifest["world_size"] == 3
    assert len(manifest["variants"]) == first.rows + again.rows + last.rows  # each row in one piece

    late = latent_array.build_piece(cfg, 0, 3)  # a task that runs after the entry exists encodes nothing
    assert not late.encoded and not late.published

    aside = again.entry.rename(tmp_path / "array-built")  # the training job's own build, for comparison
    comps = load_components(cfg.model, cfg.cache_root)
    built = latent_build.open_or_build(cfg, training_rows(cfg), comps, ONE_PROCESS)
    assert built.entry == again.entry  # the key a training job computes
    ours, theirs = _entry_rows(aside, cfg), _entry_rows(built.entry, cfg)
    for key, example in ours.items():
        for name, tensor in example.items():
            assert torch.allclose(tensor, theirs[key][name], rtol=1e-4, atol=1e-5), (key, name)


def test_a_damaged_finished_piece_is_encoded_again(make_cfg, tmp_path, tiny_model):
    cfg = _cfg(make_cfg, tmp_path)
    _link_model(cfg, tiny_model)
    first = latent_array.build_piece(cfg, 0, 2)
    piece = latent_array.pieces_dir(first.entry, 2) / "piece-0"
    posterior = next(piece.glob("posterior*.npy"))
    data = bytearray(posterior.read_bytes())
    data[-1] ^= 0xFF  # same size: only the checksum tells
    posterior.write_bytes(bytes(data))
    assert latent_array.build_piece(cfg, 0, 2).encoded
    assert latent_array.build_piece(cfg, 1, 2).published


def test_publishing_an_entry_removes_every_pieces_folder_of_it_even_one_being_encoded(
    make_cfg, tmp_path, tiny_model, caplog
):
    """An array of 2 stopped after its first piece, then one of 3 launched instead (another
    data.cache_shards): when the entry is published, the partial copies of both go. A task of the first
    array still encoding then (here: while its piece is encoded, the one-piece array publishes) ends without
    an error and without its piece."""
    _capture(caplog)
    cfg = _cfg(make_cfg, tmp_path)
    _link_model(cfg, tiny_model)
    first = latent_array.build_piece(cfg, 0, 2)
    other = latent_array.build_piece(cfg, 0, 3)
    assert (
        latent_array.pieces_dir(first.entry, 2).is_dir() and latent_array.pieces_dir(first.entry, 3).is_dir()
    )

    published: list = []

    def meanwhile() -> bool:  # at the piece's first batch: another array of one piece publishes the entry
        if not published:
            published.append(latent_array.build_piece(cfg, 0, 1))
        return False

    late = latent_array.build_piece(cfg, 1, 2, should_stop=meanwhile)
    assert (
        published[0].published and verify(first.entry, first.entry.name, latent_array.CACHE_VERSION) is None
    )
    assert not late.encoded and not late.published and late.rows == 0
    assert "was published while piece 2 was encoded: not needed" in caplog.text
    leftovers = [p.name for p in first.entry.parent.iterdir() if ".pieces-" in p.name]
    assert leftovers == [] and other.rows > 0


def test_a_cache_task_publishes_where_the_file_system_has_no_locks(
    make_cfg, tmp_path, tiny_model, monkeypatch, caplog
):
    """``flock`` failing with ENOLCK (an NFS mount without a lock daemon): the cache task publishes without
    the lock, with a warning, as a training job builds without it; and the two ask for the same lock file,
    so where locks do work a cache task never publishes while a training job builds that entry."""
    locked: list[Path] = []

    def no_locks(handle, operation: int) -> None:
        locked.append(Path(handle.name))
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    # Only the cache's own locks fail: datasets and the hub take theirs through filelock, which probes too.
    fake = SimpleNamespace(flock=no_locks, LOCK_EX=fcntl.LOCK_EX, LOCK_NB=fcntl.LOCK_NB)
    monkeypatch.setattr(latent_build, "fcntl", fake)
    _capture(caplog)
    cfg = _cfg(make_cfg, tmp_path)
    _link_model(cfg, tiny_model)
    result = latent_array.build_piece(cfg, 0, 1)
    assert result.published
    assert verify(result.entry, result.entry.name, latent_array.CACHE_VERSION) is None
    assert "going on without a lock" in caplog.text
    with latent_build.build_lock(result.entry, ONE_PROCESS):  # the training job's lock on the same entry
        pass
    assert locked == [result.entry.parent / f".{result.entry.name}.lock"] * 2  # cache task, training job


ONE_STEP = ["train.max_steps=1", "train.validate_every=0", "train.validation_prompts=[]"]


def test_two_last_pieces_publishing_at_once_without_a_lock_leave_one_entry(
    make_cfg, tmp_path, tiny_model, monkeypatch
):
    """Where the file system has no locks, the tasks of the two last pieces can both find every piece done:
    the second publisher, its links pulled away by the first's commit, leaves the entry as it is."""
    cfg = _cfg(make_cfg, tmp_path)
    _link_model(cfg, tiny_model)
    assert not latent_array.build_piece(cfg, 0, 2).published
    monkeypatch.setattr(latent_array, "entry_lock", lambda entry: contextlib.nullcontext())  # no locks
    real_link, real_publish, other = os.link, latent_array._publish_entry, []

    def publish(*args):
        def link(src, dst):  # the other task publishes (and removes the pieces) while this one links
            if not other:
                monkeypatch.setattr(os, "link", real_link)
                other.append(real_publish(*args))
            return real_link(src, dst)

        monkeypatch.setattr(os, "link", link)
        return real_publish(*args)

    monkeypatch.setattr(latent_array, "_publish_entry", publish)
    result = latent_array.build_piece(cfg, 1, 2)
    assert other == [True] and not result.published  # the other one published it; this one left it be
    assert verify(result.entry, result.entry.name, latent_array.CACHE_VERSION) is None
    assert not list(result.entry.parent.glob(".*.pieces-*")) and not list(result.entry.parent.glob(".tmp*"))


@pytest.mark.slow
def test_a_killed_cache_job_keeps_its_finished_pieces_and_launch_finishes_the_entry(
    make_cfg, tmp_path, tiny_model
):
    """SIGKILL in the middle of piece 1 (held at its first batch), then ``launch task=train`` with the same
    ``data.cache_shards``: its cache array runs first (one task after another on the local executor), keeps
    piece 0, encodes piece 1 again and publishes the entry, which the training job then reads as it is."""
    cfg = _cfg(make_cfg, tmp_path)
    _link_model(cfg, tiny_model)
    assert latent_array.build_piece(cfg, 0, 2).encoded
    overrides = [
        f"data.path={cfg.data.path}",
        f"cache_root={cfg.cache_root}",
        f"output_root={tmp_path / 'outputs'}",
        f"jobs_root={tmp_path / 'jobs'}",
    ]
    script = (
        "import sys, logging; from tests.conftest import compose; "
        "from sdcluster.runtime import step_events; from sdcluster.runtime.callables import setup_logging; "
        "from sdcluster.data.latent_array import build_piece; setup_logging(0); "
        "cfg = compose(sys.argv[1:])\n"
        "with step_events.requested_pause(limit_s=600): build_piece(cfg, 1, 2)"
    )
    env = {**os.environ, "SDCLUSTER_TEST_PAUSE": "batch:1", "PYTHONPATH": str(REPO)}
    killed = subprocess.Popen(
        [sys.executable, "-c", script, *overrides],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in killed.stdout:  # ends when the process does: no sleep, the pause line is the cue
        lines.append(line)
        if "paused at batch 1" in line:
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "".join(lines)
    pieces = next(Path(cfg.cache_root, "latents").glob(".*.pieces-2"))
    assert sorted(p.name for p in pieces.iterdir() if not p.name.startswith(".")) == ["piece-0"]
    assert list(pieces.glob(".tmp-piece-1-*"))  # what the kill left: never published, never read

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdcluster.launch",
            "task=train",
            "data.cache_shards=2",
            *overrides,
            *ONE_STEP,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    logs = {p.read_text() for p in Path(tmp_path / "jobs").rglob("*_0_log.out")}
    (trained,) = [text for text in logs if "step 1/1" in text]
    built = "".join(logs - {trained})
    assert "piece 1 of 2 was finished by an earlier attempt: kept" in built  # piece-0 (logs count from 1)
    assert "piece 2 of 2: " in built  # piece-1, encoded again
    assert "every piece done; published" in built
    entries = [p for p in Path(cfg.cache_root, "latents").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and verify(entries[0], entries[0].name, latent_array.CACHE_VERSION) is None
    assert f"latent cache: {entries[0]} (" in trained and "encoding rows" not in trained


def test_half_precision_training_reads_the_entry_a_cache_task_built(
    make_cfg, tmp_path, tiny_model, monkeypatch, fresh_accelerate_state
):
    """The key holds the encoders' dtypes: the cache task casts them as training does under bf16, so the
    training job encodes nothing (and a float32 build is another entry)."""
    from sdcluster.train.loop import train

    run = ["train.max_steps=1", "train.checkpoint_every=100", f"output_root={tmp_path / 'out'}"]
    cfg = _cfg(make_cfg, tmp_path, extra=[*run, "train.mixed_precision=bf16"])
    _link_model(cfg, tiny_model)
    half = latent_array.build_piece(cfg, 0, 1)
    assert half.published
    assert latent_array.build_piece(_cfg(make_cfg, tmp_path, extra=run), 0, 1).entry != half.entry
    builds = []
    real = latent_build.encode_share
    monkeypatch.setattr(latent_build, "encode_share", lambda *a, **k: builds.append(1) or real(*a, **k))
    assert train(cfg).step == 1
    assert builds == []
