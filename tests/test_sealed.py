"""One verifier for both sealed folders: a checkpoint and a latent-cache entry, each in its own manifest
format on disk, are checked file by file by :func:`sdcluster.sealed.files_problem` and give the same
answers for the same damage; a manifest entry that lost its size is named, not a crash."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from sdcluster import sealed
from sdcluster.data import latent_cache
from sdcluster.train import step_folders

KEY, VERSION = "k" * 24, latent_cache.CACHE_VERSION


def _checkpoint(root: Path) -> Path:
    """A sealed ``step-2`` folder with a nested file, as :func:`step_folders._commit` writes one."""
    folder = root / step_folders.step_name(2)
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights" * 10)
    (folder / "sub" / "random_states_0.pkl").write_bytes(b"rng" * 10)
    meta = step_folders.CheckpointMeta(2, 2, "h", 1, 1, 1)
    meta.files = step_folders._file_entries(folder)
    (folder / step_folders.META_NAME).write_text(json.dumps(step_folders.seal(meta)))
    return folder


def _cache_entry(root: Path) -> Path:
    """A sealed one-shard cache entry, as :func:`latent_cache.commit` publishes one."""
    tmp = root / "tmp"
    tmp.mkdir(parents=True)
    (tmp / "posterior.0.npy").write_bytes(b"posterior" * 10)
    (tmp / "text.0.npy").write_bytes(b"text" * 10)
    manifest = {"version": VERSION, "key": KEY, "world_size": 1, "text_arrays": ["text"]}
    latent_cache.commit(tmp, root / "entry", manifest)
    return root / "entry"


def _verify_checkpoint(folder: Path) -> str | None:
    return step_folders.verify(folder, content=True)


def _verify_entry(folder: Path) -> str | None:
    return latent_cache.verify(folder, KEY, VERSION)


KINDS = {
    "checkpoint": (_checkpoint, _verify_checkpoint, "model.safetensors"),
    "cache entry": (_cache_entry, _verify_entry, "posterior.0.npy"),
}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[3] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate, "bytes, the manifest says"),
    "byte flipped": (_flip, "does not match its sha256"),
    "deleted": (Path.unlink, "missing"),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("damage", DAMAGE)
def test_both_sealed_folders_name_the_same_damage_the_same_way(
    tmp_path: Path, kind: str, damage: str
) -> None:
    make, verify, name = KINDS[kind]
    folder = make(tmp_path)
    assert verify(folder) is None
    harm, reason = DAMAGE[damage]
    harm(folder / name)
    problem = verify(folder)
    assert problem is not None and name in problem and reason in problem


def test_the_file_lists_of_both_formats_are_made_alike(tmp_path: Path) -> None:
    checkpoint = json.loads((_checkpoint(tmp_path / "c") / step_folders.META_NAME).read_text())["files"]
    entry = json.loads((_cache_entry(tmp_path / "e") / latent_cache.ENTRY_MANIFEST).read_text())["files"]
    assert set(checkpoint) == {"model.safetensors", "sub/random_states_0.pkl"}  # relative, nested
    assert set(entry) == {"posterior.0.npy", "text.0.npy"}
    for listed in (*checkpoint.values(), *entry.values()):
        assert set(listed) == {"bytes", "sha256"} and len(listed["sha256"]) == 64


def test_a_cache_entry_whose_manifest_lost_a_size_is_named_not_a_crash(tmp_path: Path) -> None:
    entry = _cache_entry(tmp_path)
    path = entry / latent_cache.ENTRY_MANIFEST
    manifest = json.loads(path.read_text())
    del manifest["files"]["text.0.npy"]["bytes"]
    path.write_text(json.dumps(manifest))
    assert _verify_entry(entry) == "the manifest's entry for text.0.npy has no size (edited or corrupt)"


def test_a_resealed_checkpoint_whose_entry_lost_its_size_is_named_not_a_crash(tmp_path: Path) -> None:
    folder = _checkpoint(tmp_path)
    path = folder / step_folders.META_NAME
    data = json.loads(path.read_text())
    data["files"]["model.safetensors"] = {"sha256": data["files"]["model.safetensors"]["sha256"]}
    data["digest"] = step_folders.seal(step_folders.CheckpointMeta(**data))["digest"]
    path.write_text(json.dumps(data))
    assert "entry for model.safetensors has no size" in _verify_checkpoint(folder)


def test_an_entry_without_a_checksum_is_checked_by_size(tmp_path: Path) -> None:
    """Checkpoints written before checksums list sizes only: still verified, by size."""
    (tmp_path / "a.bin").write_bytes(b"abc")
    assert sealed.files_problem(tmp_path, {"a.bin": {"bytes": 3}}) is None
    assert "a.bin is 3 bytes, the manifest says 4" in sealed.files_problem(tmp_path, {"a.bin": {"bytes": 4}})
