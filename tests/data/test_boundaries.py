"""A dataset folder is read only inside itself and only as JPEG, PNG or WebP judged by content, by validate
and by the job alike: what validate passes never fails in the job for a data reason."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from sdcluster.data.dataset import load_captioned_images
from sdcluster.data.metadata import validate
from sdcluster.paths import sample_data_dir


def _folder(tmp: Path, extra: dict[str, str]) -> Path:
    """The sample plus ``extra`` metadata lines (file name -> caption) for files the test puts there."""
    folder = tmp / "data"
    shutil.copytree(sample_data_dir(), folder)
    with (folder / "metadata.jsonl").open("a") as fh:
        for name, caption in extra.items():
            fh.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return folder


def _problems(folder: Path) -> dict[str, str]:
    return {p.file_name: p.kind for p in validate(folder)}


def test_symlinks_out_of_the_folder_are_refused_inside_ones_are_fine(tmp_path):
    outside = tmp_path / "elsewhere.png"
    shutil.copy(sample_data_dir() / "11 (12).png", outside)
    folder = _folder(tmp_path, {"passwd.png": "a", "outside.png": "b", "inside.png": "c"})
    os.symlink("/etc/passwd", folder / "passwd.png")
    os.symlink(outside, folder / "outside.png")
    os.symlink(folder / "11 (12).png", folder / "inside.png")
    assert _problems(folder) == {"passwd.png": "outside_folder", "outside.png": "outside_folder"}
    with pytest.raises(
        ValueError, match=r"line 13: 'passwd.png': resolves to /etc/passwd, outside the dataset folder"
    ):
        load_captioned_images(folder, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "GIF"])
def test_a_file_named_png_is_judged_by_its_content(tmp_path, fmt):
    folder = _folder(tmp_path, {"disguised.png": "jeans"})
    Image.new("RGB", (64, 64), "blue").save(folder / "disguised.png", format=fmt)
    assert _problems(folder) == {"disguised.png": "unreadable"}
    with pytest.raises(ValueError, match=r"'disguised.png': is not a JPEG, PNG, WEBP file by its content"):
        load_captioned_images(folder, cache_dir=tmp_path / "cache")


def test_webp_and_mislabelled_but_allowed_formats_pass(tmp_path):
    folder = _folder(tmp_path, {"photo.webp": "a", "really-a-jpeg.png": "b"})
    Image.new("RGB", (64, 64), "red").save(folder / "photo.webp", format="WEBP")
    Image.new("RGB", (64, 64), "green").save(folder / "really-a-jpeg.png", format="JPEG")
    assert _problems(folder) == {}
    assert len(load_captioned_images(folder, cache_dir=tmp_path / "cache")) == 14
