"""Checkpoints are atomic, pruned only after a save commits, and a bad newest one falls back."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sdcluster.atomic import file_sha256
from sdcluster.config import ConfigError
from sdcluster.runtime.step_events import stop_at
from sdcluster.train import step_folders
from sdcluster.train.loop import train

FAST = ["train.log_every=1", "train.batch_size=2", "train.checkpoint_every=2", "train.max_steps=4"]
OLDER_FORMAT_LACKS = ("digest", "format", "origin_step", "origin_micro_step")
QUIET = ["train.validate_every=0", "train.validation_prompts=[]"]  # no validation images: faster


def _fake_checkpoint(root: Path, step: int) -> Path:
    folder = root / step_folders.step_name(step)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * (10 + step))
    meta = step_folders.CheckpointMeta(step, step, "h", 1, 1, 1, files={"model.safetensors": 10 + step})
    (folder / step_folders.META_NAME).write_text(json.dumps(step_folders.seal(meta)))
    return folder


def _edit_manifest(folder: Path, edit) -> None:
    path = folder / step_folders.META_NAME
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _reseal(data: dict) -> None:
    """What a careful editor would do: make the digest match the edited manifest."""
    data["digest"] = step_folders.seal(step_folders.CheckpointMeta(**data))["digest"]


TAMPERED = {  # each leaves every listed file intact: only the manifest's own consistency can tell
    "step edited": (lambda d: d.update(step=d["step"] + 2), "does not match its own digest"),
    "another field edited": (lambda d: d.update(config_hash="0" * 12), "does not match its own digest"),
    "digest removed": (lambda d: d.pop("digest"), "has no digest"),
    "step edited, digest redone": (
        lambda d: (d.update(step=d["step"] + 2), _reseal(d)),
        "its manifest says step",
    ),
    "micro-step edited, digest redone": (
        lambda d: (d.update(micro_step=d["micro_step"] + 1), _reseal(d)),
        "does not follow from step",
    ),
}


@pytest.mark.parametrize("edit, reason", TAMPERED.values(), ids=TAMPERED.keys())
def test_a_manifest_that_does_not_agree_with_itself_is_not_usable(tmp_path, caplog, edit, reason):
    _fake_checkpoint(tmp_path, 2)
    newest = _fake_checkpoint(tmp_path, 4)
    assert step_folders.verify(newest, content=True) is None
    _edit_manifest(newest, edit)
    assert reason in step_folders.verify(newest, content=True)
    with caplog.at_level(logging.WARNING, logger="sdcluster"):
        assert [p.name for p in step_folders.complete_checkpoints(tmp_path)] == ["step-00000002"]
    assert f"checkpoint {newest} is not usable" in caplog.text and reason in caplog.text


def test_a_renamed_checkpoint_folder_is_not_usable(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    renamed = _fake_checkpoint(tmp_path, 4).rename(tmp_path / step_folders.step_name(6))
    problem = step_folders.verify(renamed, content=True)
    assert problem == "named step-00000006, its manifest says step 4 (folder renamed or manifest edited)"
    assert [p.name for p in step_folders.complete_checkpoints(tmp_path)] == ["step-00000002"]


def test_a_checkpoint_named_by_train_resume_may_have_any_name_but_must_agree_with_itself(tmp_path):
    """A copy kept as ``best/`` is what ``train.resume=PATH`` is for: its digest proves its step."""
    best = _fake_checkpoint(tmp_path / "run", 4).rename(tmp_path / "best")
    assert step_folders.resume_folder(str(best)) == best
    assert "its manifest says step 4" in step_folders.verify(best)  # among a run's step-N folders: not usable
    _edit_manifest(best, lambda data: data.update(step=6))
    with pytest.raises(ConfigError, match=r"train.resume: .*best \S+ does not match its own digest"):
        step_folders.resume_folder(str(best))


def test_an_older_manifest_without_a_digest_is_accepted_but_its_folder_name_still_checked(tmp_path):
    older = _fake_checkpoint(tmp_path, 4)
    _edit_manifest(older, lambda d: [d.pop(k) for k in OLDER_FORMAT_LACKS])
    assert step_folders.verify(older, content=True) is None
    assert step_folders.read_meta(older).format is None
    renamed = older.rename(tmp_path / step_folders.step_name(5))
    assert "its manifest says step 4" in step_folders.verify(renamed)


def test_prune_keeps_newest_complete_and_never_fewer_than_two(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / ".tmp-step-00000003").mkdir()  # leftover of an interrupted save, older than the newest
    (tmp_path / ".tmp-step-00000009").mkdir()  # a save that may still be running: left alone
    step_folders.prune(tmp_path, keep=1)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [".tmp-step-00000009", "step-00000004", "step-00000005"]


def test_incomplete_and_truncated_checkpoints_are_skipped_with_a_named_warning(tmp_path, caplog):
    _fake_checkpoint(tmp_path, 1)
    truncated = _fake_checkpoint(tmp_path, 2)
    (truncated / "model.safetensors").write_bytes(b"x")
    no_meta = tmp_path / step_folders.step_name(3)
    no_meta.mkdir()
    with caplog.at_level(logging.WARNING, logger="sdcluster"):
        good = step_folders.complete_checkpoints(tmp_path)
    assert [p.name for p in good] == ["step-00000001"]
    assert "step-00000002" in caplog.text and "truncated" in caplog.text
    assert "step-00000003" in caplog.text and "did not finish" in caplog.text


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from tests.conftest import compose
    from sdcluster.train import checkpointer
    from sdcluster.train.loop import train

    original = checkpointer.write_extra

    def write_extra_then_die(folder, *args, **kwargs):
        if folder.name.endswith("00000004"):
            original(folder, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)  # killed after accelerate wrote, before the commit
        return original(folder, *args, **kwargs)

    checkpointer.write_extra = write_extra_then_die
    train(compose({overrides!r}))
    """
)


@pytest.mark.slow
def test_sigkill_during_save_leaves_previous_checkpoint_usable(make_cfg, tmp_path, caplog):
    cfg = make_cfg(FAST)
    overrides = [
        *FAST,
        f"output_root={cfg.output_root}",
        f"jobs_root={cfg.jobs_root}",
        f"cache_root={cfg.cache_root}",
    ]
    script = KILL_SCRIPT.format(repo=str(Path(__file__).resolve().parents[1]), overrides=overrides)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]

    from sdcluster.paths import run_paths

    ckpts = run_paths(cfg).checkpoints
    assert (ckpts / ".tmp-step-00000004" / "model.safetensors").is_file()  # the half-written save
    assert [p.name for p in step_folders.complete_checkpoints(ckpts)] == ["step-00000002"]
    assert (ckpts / "latest").read_text().strip() == "step-00000002"

    with caplog.at_level(logging.INFO, logger="sdcluster"):
        result = train(cfg)
    assert "resumed from" in caplog.text and "step-00000002" in caplog.text
    assert result.step == 4
    assert not (ckpts / ".tmp-step-00000004").exists()
    assert [p.name for p in step_folders.complete_checkpoints(ckpts)] == ["step-00000004", "step-00000002"]


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_to_previous(make_cfg, caplog):
    cfg = make_cfg(FAST)
    first = train(cfg)
    newest = first.run_dir / "checkpoints" / "step-00000004"
    weights = newest / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as fh:  # same size, garbage header: only loading can tell
        fh.write(b"\xff" * 64)
    assert weights.stat().st_size == size
    cfg.train.max_steps = 6
    with caplog.at_level(logging.INFO, logger="sdcluster"):
        result = train(cfg)
    assert "could not load checkpoint" in caplog.text and str(newest) in caplog.text
    assert "resumed from" in caplog.text and "step-00000002" in caplog.text
    assert result.step == 6


@pytest.mark.slow
def test_checkpoint_meta_is_human_readable(make_cfg):
    cfg = make_cfg([*FAST, "train.max_steps=2"])
    result = train(cfg, job_id="4242")
    folder = step_folders.complete_checkpoints(result.run_dir / "checkpoints")[0]
    meta = json.loads((folder / step_folders.META_NAME).read_text())
    assert meta["step"] == 2 and meta["job_id"] == "4242" and meta["world_size"] == 1
    assert set(meta["files"]) >= {"model.safetensors", "optimizer.bin", "train_state.json"}
    assert all(os.path.getsize(folder / n) == e["bytes"] for n, e in meta["files"].items())
    assert all(file_sha256(folder / n) == e["sha256"] for n, e in meta["files"].items())


@pytest.mark.slow
def test_a_flipped_byte_in_an_rng_state_makes_the_checkpoint_bad(make_cfg, caplog):
    """Same size, valid pickle framing untouched elsewhere: only the sha256 in the manifest can tell."""
    cfg = make_cfg(FAST)
    first = train(cfg)
    newest = first.run_dir / "checkpoints" / "step-00000004"
    (rng,) = newest.glob("random_states_*.pkl")
    data = bytearray(rng.read_bytes())
    data[len(data) // 2] ^= 0xFF
    rng.write_bytes(bytes(data))
    assert step_folders.verify(newest) is None, "sizes alone cannot see it"
    assert "random_states_0.pkl does not match its sha256" in step_folders.verify(newest, content=True)
    cfg.train.max_steps = 6
    with caplog.at_level(logging.INFO, logger="sdcluster"):
        result = train(cfg)
    assert f"could not load checkpoint {newest}" in caplog.text and "sha256" in caplog.text
    assert "step-00000002" in caplog.text and result.step == 6


@pytest.mark.slow
def test_an_edited_or_renamed_newest_checkpoint_is_skipped_and_the_run_resumes_from_the_previous(
    make_cfg, tmp_path, caplog
):
    """The issue's case: ``"step": 4`` edited to 6 resumed "at step 6 (micro-step 4)". Each edit is tried on
    a copy of the same finished run; every one resumes from step 2 and ends where it should."""
    cfg = make_cfg([*FAST, *QUIET])
    run_dir = train(cfg).run_dir
    pristine = tmp_path / "pristine"
    shutil.copytree(run_dir, pristine)
    cfg.train.max_steps = 6
    edits = {
        "step edited": (lambda f: _edit_manifest(f, lambda d: d.update(step=6)), "its own digest"),
        "another field": (lambda f: _edit_manifest(f, lambda d: d.update(batch_size=1)), "its own digest"),
        "digest removed": (lambda f: _edit_manifest(f, lambda d: d.pop("digest")), "has no digest"),
        "folder renamed": (lambda f: f.rename(f.with_name("step-00000005")), "its manifest says step 4"),
    }
    for name, (edit, reason) in edits.items():
        shutil.rmtree(run_dir)
        shutil.copytree(pristine, run_dir)
        edit(run_dir / "checkpoints" / "step-00000004")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sdcluster"):
            result = train(cfg)
        assert "is not usable" in caplog.text and reason in caplog.text, name
        resumed = run_dir / "checkpoints" / "step-00000002"
        assert f"resumed from {resumed} at step 2 (micro-step 2)" in caplog.text, name
        assert result.step == 6, name


@pytest.mark.slow
def test_a_resume_that_changes_the_accumulation_keeps_its_manifests_consistent(make_cfg, tmp_path, caplog):
    """accelerate's micro-step counter would cut the first step after the change short; the manifest then
    could not prove its micro-step. Every step after the change is ``grad_accum`` micro-steps."""
    with stop_at(lambda step: step == 2):
        first = train(make_cfg([*FAST, *QUIET, "train.grad_accum=2"]))
    resume = f"train.resume={first.run_dir / 'checkpoints' / 'step-00000002'}"
    cfg = make_cfg([*FAST, *QUIET, "train.grad_accum=3", "train.allow_resume_change=true", resume])
    with caplog.at_level(logging.WARNING, logger="sdcluster"):
        result = train(cfg)
    assert result.step == 4 and "not usable" not in caplog.text
    newest = result.run_dir / "checkpoints" / "step-00000004"
    meta = step_folders.read_meta(newest)
    assert (meta.origin_step, meta.origin_micro_step, meta.micro_step) == (2, 4, 4 + 2 * 3)
    assert step_folders.verify(newest, content=True) is None


@pytest.mark.slow
def test_an_older_manifest_resumes_with_a_warning_and_the_next_save_is_current(make_cfg, caplog):
    cfg = make_cfg([*FAST, *QUIET])
    newest = train(cfg).run_dir / "checkpoints" / "step-00000004"
    _edit_manifest(newest, lambda d: [d.pop(key) for key in OLDER_FORMAT_LACKS])
    cfg.train.max_steps = 6
    with caplog.at_level(logging.INFO, logger="sdcluster"):
        result = train(cfg)
    assert f"checkpoint {newest} has an older manifest without a digest" in caplog.text
    assert f"resumed from {newest} at step 4" in caplog.text and result.step == 6
    meta = step_folders.read_meta(newest.with_name("step-00000006"))
    assert (meta.format, meta.origin_step, meta.micro_step) == (step_folders.FORMAT, 4, 6) and meta.digest
