"""A full file system loses nothing and explains itself, down to the launcher's line; freeing space resumes.

Tested on a really full file system: a small tmpfs the test mounts (the suite runs as root) and fills.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

import pytest

from sdcluster.atomic import DiskFullError
from sdcluster.runtime.step_events import stop_at
from sdcluster.train import step_folders
from sdcluster.train.loop import train

pytestmark = pytest.mark.slow

FAST = ["task=train", "train.checkpoint_every=2", "train.max_steps=4", "train.validate_every=0"]


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)], check=True, timeout=30)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=30)


def _fill(disk: Path, leave_bytes: int) -> Path:
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(filler, "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, free - leave_bytes)
    return filler


def test_disk_full_during_a_save_keeps_the_previous_checkpoint_and_resumes(make_cfg, small_disk, caplog):
    cfg = make_cfg([*FAST, f"output_root={small_disk / 'outputs'}", "train.validation_prompts=[]"])
    with stop_at(lambda step: step == 2):  # a preemption after the step-2 checkpoint
        first = train(cfg)
    checkpoints = first.run_dir / "checkpoints"
    assert first.interrupted and step_folders.verify(checkpoints / "step-00000002", content=True) is None

    filler = _fill(small_disk, leave_bytes=2 * 2**20)  # the next save (about 17 MB) cannot fit
    with pytest.raises(DiskFullError) as err:
        train(cfg)
    message = str(err.value)
    assert f"no space left writing {checkpoints / 'step-00000004'}" in message
    assert "MiB free of 96 MiB there" in message and "run the same command again" in message
    assert not list(checkpoints.glob(".tmp-*")), "the partial save is removed, its space given back"
    assert [p.name for p in step_folders.complete_checkpoints(checkpoints)] == ["step-00000002"]
    assert step_folders.verify(checkpoints / "step-00000002", content=True) is None

    filler.unlink()
    with caplog.at_level(logging.INFO, logger="sdcluster"):
        done = train(cfg)
    assert f"resumed from {checkpoints / 'step-00000002'}" in caplog.text
    assert done.step == 4 and not done.interrupted and (done.model_dir / "model_index.json").is_file()


def test_disk_full_while_generating_keeps_finished_images_and_the_rerun_fills_the_rest(
    small_disk, tiny_model
):
    from sdcluster.config import Config, GenerateConfig
    from sdcluster.generate.job import generate_images

    gen = GenerateConfig(prompts=["jeans"], num_images=6, batch_size=2, steps=2, height=64, width=64)
    cfg = Config(task="generate", output_root=str(small_disk / "out"), generate=gen)
    cfg.generate.model = str(tiny_model)
    first = generate_images(cfg, should_stop=iter([False, True]).__next__)  # one batch, then a stop
    assert first.interrupted and first.generated == 2
    kept = {p.name: p.read_bytes() for p in first.out_dir.glob("p*.png")}
    filler = _fill(small_disk, leave_bytes=0)
    with pytest.raises(
        DiskFullError, match=r"no space left writing .*p0000-i000[2-5]\.png .*the same command again"
    ):
        generate_images(cfg)
    assert not list(first.out_dir.glob(".*.tmp")), "no partial image is left"
    assert {p.name: p.read_bytes() for p in first.out_dir.glob("p*.png") if p.name in kept} == kept
    filler.unlink()
    done = generate_images(cfg)
    assert sorted(p.name for p in done.out_dir.glob("p*.png")) == [f"p0000-i000{i}.png" for i in range(6)]


def _launch_failure(cfg, monkeypatch, tmp_path) -> str:
    """The line the launcher prints about the failed job (local: a process of its own, as on a cluster)."""
    from sdcluster.cluster.submit_and_wait import launch

    monkeypatch.setenv("SDCLUSTER_HOME", str(tmp_path / "home"))
    said: list[str] = []
    assert launch(cfg, say=said.append) == 1, "\n".join(said)
    (line,) = [line for line in said if " FAILED: " in line]
    return line


def test_the_launcher_explains_a_full_output_root_during_a_checkpoint_save(
    make_cfg, small_disk, monkeypatch, tmp_path
):
    cfg = make_cfg([*FAST, "train.validation_prompts=[]", f"output_root={small_disk / 'outputs'}"])
    _fill(small_disk, leave_bytes=2 * 2**20)  # room for the run folder's small files, not a checkpoint
    line = _launch_failure(cfg, monkeypatch, tmp_path)
    explained = r"train job \S+ FAILED: \S*DiskFullError: no space left writing \S+/step-00000002 "
    assert re.search(explained, line), line
    assert "MiB free of 96 MiB there" in line and "point output_root at" in line, line


def test_the_launcher_explains_a_full_output_root_while_writing_images(
    small_disk, tiny_model, make_cfg, monkeypatch, tmp_path
):
    from sdcluster.generate.job import generate_images

    gen = ["task=generate", f"generate.model={tiny_model}", "generate.prompts=[jeans]"]
    gen += ["generate.num_images=6", "generate.batch_size=2", "generate.steps=2"]
    cfg = make_cfg([*gen, "generate.height=64", "generate.width=64", f"output_root={small_disk / 'out'}"])
    first = generate_images(cfg, should_stop=iter([False, True]).__next__)  # settings, 2 images (~12 KB each)
    # the launcher and the job rewrite the folder's small files (a page each); the next image does not fit
    _fill(small_disk, leave_bytes=8 * 2**10)
    line = _launch_failure(cfg, monkeypatch, tmp_path)
    image = rf"{first.out_dir}/p0000-i000[2-5]\.png"
    explained = rf"generate job \S+ FAILED: \S*DiskFullError: no space left writing {image} "
    assert re.search(explained, line), line
    assert "point output_root at" in line and "finished images are kept" in line, line


def test_the_launcher_explains_a_full_cache_root_while_building_the_tiny_model(
    make_cfg, small_disk, monkeypatch, tmp_path
):
    cfg = make_cfg([*FAST, "train.max_steps=2", f"cache_root={small_disk / 'cache'}"])
    _fill(small_disk, leave_bytes=256 * 2**10)  # the tokenizer fits, the weights do not
    line = _launch_failure(cfg, monkeypatch, tmp_path)
    explained = r"train job \S+ FAILED: \S*DiskFullError: no space left writing \S+/models/tiny/v1 "
    assert re.search(explained, line), line
    assert "point cache_root at" in line and "the model is built again" in line, line
    assert not list((small_disk / "cache").rglob("*.safetensors")), "the partial model is removed"


def test_the_launcher_explains_a_full_jobs_root_before_anything_runs(
    tmp_path, small_disk, cache_root, tiny_model
):
    """The launcher's own writes (submitit's pickles and script in jobs/) on a full file system: one explained
    line and exit code 1, not a traceback."""
    import sys

    _fill(small_disk, leave_bytes=0)
    args = [sys.executable, "-m", "sdcluster.launch", *FAST, "train.max_steps=2"]
    args += [
        f"output_root={tmp_path / 'outputs'}",
        f"jobs_root={small_disk / 'jobs'}",
        f"cache_root={cache_root}",
    ]
    env = {**os.environ, "SDCLUSTER_HOME": str(tmp_path / "home")}
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert re.match(rf"sdcluster: no space left writing {small_disk / 'jobs'}", line), line
    assert "point jobs_root at" in line, line
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.safetensors"))
