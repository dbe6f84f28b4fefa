"""Modes of what :mod:`sdcluster.atomic` publishes, and the umask handed from the launcher to the job."""

from __future__ import annotations

import os
import stat

import torch
from safetensors.torch import save_file

from sdcluster import atomic


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_published_weights_follow_the_umask_like_every_other_file(tmp_path):
    """safetensors writes through a 0600 temp file whatever the umask; a shared run folder needs 0664."""
    dest = tmp_path / "model"
    with atomic.umask(0o002):
        tmp = atomic.staging_dir(dest)
        save_file({"w": torch.zeros(2)}, str(tmp / "unet.safetensors"))
        atomic.write_json(tmp / "config.json", {})
        atomic.publish_dir(tmp, dest)
    assert {p.name: oct(_mode(p)) for p in dest.iterdir()} == {
        "unet.safetensors": "0o664",
        "config.json": "0o664",
    }
    assert oct(_mode(dest)) == "0o775"


def test_a_hard_linked_weight_file_keeps_its_mode(tmp_path):
    """A hard link is another file's inode too: changing its mode would change that file's."""
    original = tmp_path / "elsewhere.safetensors"
    save_file({"w": torch.zeros(2)}, str(original))
    original.chmod(0o600)
    tmp = atomic.staging_dir(tmp_path / "model")
    os.link(original, tmp / "linked.safetensors")
    with atomic.umask(0o002):
        atomic.publish_dir(tmp, tmp_path / "model")
    assert oct(_mode(original)) == "0o600"


def test_the_job_gets_the_users_umask_back_for_its_outputs(monkeypatch):
    monkeypatch.delenv(atomic.OUTPUT_UMASK_ENV, raising=False)
    with atomic.umask(0o002):
        with atomic.submission_umask(0o077):
            assert os.environ[atomic.OUTPUT_UMASK_ENV] == "0002"
            probe = os.umask(0o077)  # what a job forked now inherits
            os.umask(probe)
            assert probe == 0o077
            with atomic.output_umask():  # in the job, around its work
                inner = os.umask(0o077)
                os.umask(inner)
        assert inner == 0o002
        assert atomic.OUTPUT_UMASK_ENV not in os.environ, "the launcher's environment is put back"
        with atomic.output_umask():  # a job started without the variable keeps the umask it has
            assert os.umask(0o002) == 0o002
