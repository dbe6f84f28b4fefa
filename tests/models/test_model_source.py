"""The kind of a model path (embedded, local folder, hub id) is decided once, in ``sdcluster.model_source``,
and every module that cares (path absolutizing, the loader, the latent cache's model files) agrees."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdcluster import model_source
from sdcluster.config import ConfigError
from sdcluster.models.load import check_model_source, model_files
from tests.conftest import compose


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("tiny", "embedded"),
        ("tiny_sdxl", "embedded"),
        ("CompVis/stable-diffusion-v1-4", "hub"),
        ("/models/missing", "local"),  # spelled as a path: a missing folder, not a bad hub id
        ("./missing", "local"),
        ("~/missing", "local"),
        ("owner/here", "local"),  # an existing folder wins over the hub id it looks like
        ("no-owner", "neither"),
    ],
)
def test_each_path_has_one_kind(path, kind, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "here").mkdir(parents=True)
    kinds = {
        "embedded": model_source.is_embedded(path),
        "local": model_source.is_local(path),
        "hub": model_source.is_hub_id(path),
    }
    assert [k for k, yes in kinds.items() if yes] == ([] if kind == "neither" else [kind])


def test_a_local_path_is_absolutized_and_named_whole_in_the_error(tmp_path, monkeypatch):
    """A path spelled as a folder is a folder everywhere: made absolute at launch (so a job finds it from
    any working directory), and a missing one is named as a folder, not as a hub id."""
    monkeypatch.chdir(tmp_path)
    cfg = compose(["model.path=./models/mine"])
    assert cfg.model.path == str(tmp_path / "models" / "mine")
    with pytest.raises(ConfigError, match=f"model.path: {tmp_path / 'models' / 'mine'} is not a diffusers"):
        check_model_source(cfg.model)


def test_the_latent_cache_counts_the_files_of_a_folder_named_like_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    Path("owner/name/vae").mkdir(parents=True)
    Path("owner/name/vae/config.json").write_text("{}")
    assert list(model_files("owner/name", ("vae",), None)) == ["vae/config.json"]
    assert model_files("owner/other", ("vae",), None) == {}, "a hub model not in the cache: no files known"
