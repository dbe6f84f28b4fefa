"""The shipped sample dataset is what ``python -m sdcluster.data.sample`` draws, and it fits its budget."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from sdcluster.data import METADATA_FILE, list_images, read_metadata, validate
from sdcluster.data.sample import caption, generate, make_specs
from sdcluster.paths import sample_data_dir


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("sample")
    generate(dest)
    return dest


def test_regenerating_reproduces_the_shipped_metadata(regenerated: Path) -> None:
    shipped = sample_data_dir()
    assert (regenerated / METADATA_FILE).read_bytes() == (shipped / METADATA_FILE).read_bytes()
    assert list_images(regenerated) == list_images(shipped)
    for name in list_images(shipped):
        with Image.open(shipped / name) as a, Image.open(regenerated / name) as b:
            assert (a.size, a.format) == (b.size, b.format), name
    assert validate(regenerated) == []


def test_shipped_folder_fits_the_budget_and_the_seed_naming() -> None:
    folder = sample_data_dir()
    names = list_images(folder)
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert len(names) >= 8
    assert total <= 2 * 1024 * 1024
    assert "11 (1).JPG" in names
    assert any(n.endswith(".png") for n in names)
    for name in names:
        with Image.open(folder / name) as image:
            assert all(128 <= side <= 256 for side in image.size), name


def test_captions_describe_what_was_drawn() -> None:
    folder = sample_data_dir()
    texts = {e["file_name"]: e["text"] for e in read_metadata(folder)}
    for spec in make_specs():
        text = texts[spec.file_name]
        assert text == caption(spec)
        assert f"viewed from the {spec.view}" in text
        assert f"near the {spec.marker} corner" in text
        assert ("folded" in text) == (spec.folded is not None)
        with Image.open(folder / spec.file_name) as image:
            gray = image.convert("L")
        w, h = gray.size
        inset = round(0.05 * min(w, h)) + 3
        corners = {
            "upper left": (inset, inset),
            "upper right": (w - 1 - inset, inset),
            "lower left": (inset, h - 1 - inset),
            "lower right": (w - 1 - inset, h - 1 - inset),
        }
        for corner, xy in corners.items():
            dark = gray.getpixel(xy) < 60
            assert dark == (corner == spec.marker), (spec.file_name, corner)
