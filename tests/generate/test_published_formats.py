"""Generation reads what others publish: a single-file checkpoint as ``generate.model`` and a kohya-format
LoRA file as ``generate.lora``.

The expectation is the same model in diffusers' own format: the single file is written from the tiny
model's folder (``train.single_file``, which loads back bit for bit: tests/train/test_single_file.py), so
generating from it must give the folder's images exactly; the kohya file is made from a diffusers LoRA file
(``train.lora_formats``), so generating with either must give the same image.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdcluster.config import ConfigError
from sdcluster.generate import records
from sdcluster.generate.job import generate_images
from sdcluster.generate.render import require_model
from sdcluster.train.lora_formats import write_kohya
from sdcluster.train.single_file import write_single_file
from tests.generate.test_lora_generation import write_lora

SETTINGS = ["generate.num_images=1", "generate.batch_size=1", "generate.steps=3", "generate.height=64"]
SETTINGS += ["generate.width=64", "generate.prompts=[dark blue jeans laid flat on a white background]"]


@pytest.fixture(scope="module")
def single_file(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as one file in the original layout (written into a copy of its folder)."""
    folder = tmp_path_factory.mktemp("exported") / "model"
    shutil.copytree(tiny_model, folder)
    return write_single_file(folder, "tiny")


def _image(make_cfg, overrides: list[str]) -> tuple[dict, np.ndarray]:
    result = generate_images(make_cfg(["task=generate", *SETTINGS, *overrides]))
    assert (result.generated, result.total) == (1, 1)
    (record,) = records.read_image_manifest(result.out_dir)
    with Image.open(result.out_dir / record["file"]) as image:
        return record, np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.mark.slow
def test_a_single_file_generates_what_its_folder_does(make_cfg, tiny_model, single_file):
    _, folder = _image(make_cfg, [f"generate.model={tiny_model}"])
    # its configs from generate.model_config, or from the base model (model=tiny) when that is unset
    _, named = _image(make_cfg, [f"generate.model={single_file}", f"generate.model_config={tiny_model}"])
    _, base = _image(make_cfg, [f"generate.model={single_file}"])
    assert np.array_equal(named, folder) and np.array_equal(base, folder)


@pytest.mark.slow
def test_a_kohya_lora_generates_what_its_diffusers_file_does(make_cfg, tiny_model, tmp_path):
    lora = write_lora(tiny_model, tmp_path / "lora")
    kohya = write_kohya(lora.parent, "jeans")
    _, plain = _image(make_cfg, [f"generate.model={tiny_model}"])
    _, diffusers_file = _image(make_cfg, [f"generate.model={tiny_model}", f"generate.lora={lora}"])
    _, kohya_file = _image(make_cfg, [f"generate.model={tiny_model}", f"generate.lora={kohya}"])
    assert np.abs(diffusers_file - plain).max() > 4  # the LoRA acts
    assert np.array_equal(kohya_file, diffusers_file)


def test_a_pickled_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match="pickle"):
        require_model(ckpt)
    with pytest.raises(ConfigError, match="no file"):
        require_model(tmp_path / "missing.safetensors")


def test_model_config_goes_with_a_single_file_and_names_a_pipeline(
    make_cfg, tiny_model, single_file, tmp_path
):
    with pytest.raises(ConfigError, match="single-file"):
        make_cfg([f"generate.model={tiny_model}", f"generate.model_config={tiny_model}"])
    with pytest.raises(ConfigError, match=r"model_index\.json"):
        make_cfg([f"generate.model={single_file}", f"generate.model_config={tmp_path}"])


def test_a_checkpoint_of_another_family_names_the_fix(make_cfg, single_file, cache_root):
    """An SD 1.x file with SDXL's configs: refused before loading, with the setting that fixes it."""
    from sdcluster.generate.render import load_pipeline

    cfg = make_cfg(["task=generate", "model=tiny_sdxl", f"generate.model={single_file}"])
    with pytest.raises(ConfigError) as err:
        load_pipeline(cfg)
    message = str(err.value)
    assert "StableDiffusionPipeline checkpoint" in message and "generate.model_config" in message


def test_the_base_model_is_staged_for_its_configs_only_when_needed(make_cfg, tiny_model, single_file):
    """A hub base model (``model=sd14``) is staged by launch when the single file takes its configs from
    it, and not when ``generate.model_config`` names a folder (nor for a diffusers folder, as before)."""
    from sdcluster.models.hub import needs_staging

    task = ["task=generate", "model=sd14"]
    assert needs_staging(make_cfg([*task, f"generate.model={single_file}"]))
    config = f"generate.model_config={tiny_model}"
    assert not needs_staging(make_cfg([*task, f"generate.model={single_file}", config]))
    assert not needs_staging(make_cfg([*task, f"generate.model={tiny_model}"]))
