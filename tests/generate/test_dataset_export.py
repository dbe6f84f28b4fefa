"""A finished generation folder is a dataset: datasets' imagefolder loads it, sdcluster trains on it as it is.

One 6-image program run on the tiny model (tests/generate/conftest.py) serves every test; split variants
rerun the job on copies, which renders nothing (every image is there) and only merges and exports again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import datasets
import pytest

from sdcluster import paths
from sdcluster.cluster.preflight import check_data
from sdcluster.data.dataset import load_captioned_images
from sdcluster.data.metadata import METADATA_FILE, NOT_DATA_FILE, read_metadata, validate
from sdcluster.generate import records
from sdcluster.generate.dataset_export import dataset_rows, split_of
from sdcluster.generate.job import generate_images
from tests.conftest import compose
from tests.generate.conftest import program_cfg

SLOTS = {"wash", "view"}


def load(folder: Path, cache: Path) -> datasets.DatasetDict:
    return datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=str(cache))


def test_rows_have_every_slot_and_split_by_hash_is_stable() -> None:
    made = [
        {"file": "p0000-i0000.png", "prompt": "a", "template_index": 0, "labels": {"wash": "light"}},
        {"file": "p0001-i0000.png", "prompt": "b", "template_index": 1, "labels": {"view": "back"}},
        {"file": "p0002-i0000.png", "prompt": "c"},  # made before prompt programs: no labels
    ]
    assert dataset_rows(made) == [
        {"file_name": "p0000-i0000.png", "text": "a", "template": 0, "wash": "light", "view": ""},
        {"file_name": "p0001-i0000.png", "text": "b", "template": 1, "wash": "", "view": "back"},
        {"file_name": "p0002-i0000.png", "text": "c", "template": None, "wash": "", "view": ""},
    ]
    split = {"by": "fraction", "fraction": 0.3, "seed": 0}
    rows = [{"file_name": f"p{p:04d}-i0000.png"} for p in range(400)]
    first = [split_of(row, split) for row in rows]
    assert first == [split_of(row, split) for row in rows]  # a pure function of (seed, file)
    assert 0.22 < first.count("validation") / 400 < 0.38
    assert first != [split_of(row, split | {"seed": 1}) for row in rows]


@pytest.mark.slow
def test_folder_loads_with_caption_and_slot_columns(made: Path, tmp_path: Path) -> None:
    loaded = load(made, tmp_path / "hf")
    assert list(loaded) == ["train"]  # no split asked for: one dataset
    train = loaded["train"]
    assert set(train.column_names) == {"image", "text", "template"} | SLOTS
    assert train.num_rows == 6  # the contact sheet is not an image of the dataset
    manifest = records.read_image_manifest(made)
    by_text = {row["text"]: row for row in train.remove_columns("image")}
    for record in manifest:
        row = by_text[record["prompt"]]
        assert row["template"] == record["template_index"]
        assert {s: row[s] for s in record["labels"]} == record["labels"]
    assert by_text["a pair of dark denim jeans, viewed from the front"]["view"] == "front"
    assert train[0]["image"].size == (64, 64)


@pytest.mark.slow
def test_sdcluster_trains_on_the_folder_as_it_is(made: Path, tmp_path: Path) -> None:
    assert validate(made) == []  # contact sheet and other non-data files are not "unlisted images"
    bare = shutil.copytree(made, tmp_path / "bare")
    (bare / NOT_DATA_FILE).unlink()
    problems = validate(bare)  # without it: the sheet and the gallery's thumbnails look uncaptioned
    assert {p.kind for p in problems} == {"unlisted"} and "contact_sheet.png" in {
        p.file_name for p in problems
    }
    cfg = compose(["data=imagefolder", f"data.path={made}", "data.holdout=1"])
    check_data(cfg)  # the launch-time check
    rows = load_captioned_images(made, cache_dir=tmp_path / "hf")  # what the training loader reads
    assert rows.num_rows == 6 and rows["file_name"] == [r["file"] for r in records.read_image_manifest(made)]
    assert set(rows["text"]) == {r["prompt"] for r in records.read_image_manifest(made)}


def rerun_with_split(made: Path, tiny_model: Path, program: Path, root: Path, **split: object) -> Path:
    """The made images under another output root, rerun with ``generate.split``: no image is rendered."""
    cfg = program_cfg(root, tiny_model, program)
    cfg.generate.split.__init__(**split)  # type: ignore[misc]  # runs the split's own checks
    out = paths.generation_dir(cfg)
    assert out.name == made.name  # the split does not change the folder
    shutil.copytree(made, out)
    result = generate_images(cfg)
    assert (result.generated, result.skipped) == (0, 6)
    return out


@pytest.mark.slow
def test_split_by_slot_loads_as_two_splits(
    made: Path, tiny_model: Path, program: Path, tmp_path: Path
) -> None:
    out = rerun_with_split(made, tiny_model, program, tmp_path, by="slot", slot="view", validation=["back"])
    loaded = load(out, tmp_path / "hf")
    assert sorted(loaded) == ["train", "validation"]
    assert loaded["validation"]["view"] == ["back", "back"]
    assert loaded["train"]["view"].count("back") == 0 and loaded["train"].num_rows == 4  # + template 1
    assert set(loaded["train"].column_names) == set(loaded["validation"].column_names)
    for name in ("train", "validation"):
        for row in read_metadata(out / name):  # links to the images, which stay where they were
            assert (out / name / row["file_name"]).stat().st_ino == (out / row["file_name"]).stat().st_ino
    assert len(records.image_files(out)) == 6
    assert validate(out / "validation") == [] and validate(out) == []

    # Asking for no split again removes the split folders (links only), and the folder is one dataset.
    cfg = program_cfg(tmp_path, tiny_model, program)
    assert generate_images(cfg).out_dir == out
    assert not (out / "train").exists() and not (out / "validation").exists()
    assert len(records.image_files(out)) == 6 and len(read_metadata(out)) == 6


@pytest.mark.slow
def test_split_by_fraction_by_hand_merge(made: Path, tiny_model: Path, program: Path, tmp_path: Path) -> None:
    out = rerun_with_split(made, tiny_model, program, tmp_path, by="fraction", fraction=0.5, seed=3)
    before = {name: (out / name / METADATA_FILE).read_text() for name in ("train", "validation")}
    written = (out / METADATA_FILE).stat().st_mtime_ns
    records.merge_image_manifest(out)  # by hand: the split comes from settings.json
    assert {name: (out / name / METADATA_FILE).read_text() for name in before} == before
    assert (out / METADATA_FILE).stat().st_mtime_ns == written  # unchanged, so datasets' cache stays valid
    loaded = load(out, tmp_path / "hf")
    assert loaded["train"].num_rows + loaded["validation"].num_rows == 6
    assert set(loaded["train"]["text"]).isdisjoint(loaded["validation"]["text"])
