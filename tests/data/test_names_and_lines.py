"""What ``validate`` accepts the job reads, and every bad name or line is a problem line, never a traceback.

File names that look like URLs (``::`` is fsspec's chain separator; ``#``, ``?``, ``*``, ``[`` are URL or glob
syntax), names the file system refuses, folders named like images and metadata that is not UTF-8, each tried
through ``validate``, ``prepare``, the CLI and the loader the training job uses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdcluster.data import METADATA_FILE, MetadataError, prepare, read_metadata, validate
from sdcluster.data.dataset import load_captioned_images
from sdcluster.paths import sample_data_dir
from tests.data.test_latent_cache import ONE_PROCESS

REPO = Path(__file__).resolve().parents[2]
URLISH = ["colon::x.jpg", "hash#x.png", "q?x.png", "star*x.png", "br[1].png", "sub::dir/a::b.png"]
SAMPLE = "11 (12).png"


def _folder(tmp: Path, names: list[str], stray: tuple[str, ...] = ("notes::v1.txt",)) -> Path:
    """A dataset of the sample's PNG under each of ``names`` (captioned), plus unlisted ``stray`` files."""
    folder = tmp / "data"
    folder.mkdir()
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sample_data_dir() / SAMPLE, folder / name)
    for name in stray:
        (folder / name).write_text("a stray note, not data")
    lines = [json.dumps({"file_name": n, "text": f"jeans called {n}"}) + "\n" for n in names]
    (folder / METADATA_FILE).write_text("".join(lines))
    return folder


def _append(folder: Path, line: bytes) -> None:
    with (folder / METADATA_FILE).open("ab") as fh:
        fh.write(line + b"\n")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, "-m", "sdcluster.data", *args], capture_output=True, text=True, cwd=REPO, env=env
    )


@pytest.mark.parametrize("name", URLISH)
def test_url_like_names_that_validate_accepts_are_loaded_with_their_pixels(tmp_path, name):
    folder = _folder(tmp_path, [name, "plain.png"])
    assert validate(folder) == []  # a stray notes::v1.txt is no problem either: it is not an image

    rows = load_captioned_images(folder, cache_dir=tmp_path / "cache")

    assert sorted(rows["file_name"]) == sorted([name, "plain.png"])
    row = rows[list(rows["file_name"]).index(name)]
    assert row["text"] == f"jeans called {name}"
    expected = Image.open(sample_data_dir() / SAMPLE).convert("RGB")
    assert np.array_equal(np.asarray(row["image"].convert("RGB")), np.asarray(expected))


@pytest.mark.parametrize("cache", [True, False])
def test_the_job_trains_on_url_like_names_with_and_without_the_latent_cache(make_cfg, tmp_path, cache):
    """The job's own path: the loader (and the latent cache build, which reads the files again)."""
    from sdcluster.data.loader import make_loader
    from sdcluster.models.load import load_components

    folder = _folder(tmp_path, ["colon::x.jpg", "bb::[1]#?.png"])
    suffix = f"names {cache}"  # a fresh latent-cache key for this test
    lines = [json.loads(x) for x in (folder / METADATA_FILE).read_text().splitlines()]
    (folder / METADATA_FILE).write_text(
        "".join(json.dumps({**x, "text": x["text"] + suffix}) + "\n" for x in lines)
    )
    cfg = make_cfg(
        ["data=imagefolder", f"data.path={folder}", f"data.cache={str(cache).lower()}", "train.batch_size=2"]
    )
    comps = load_components(cfg.model, cfg.cache_root)

    batch = next(iter(make_loader(cfg, comps, ONE_PROCESS, 0)))

    key = "posterior" if cache else "pixel_values"
    assert key in batch and batch[key].shape[0] == 2 and torch.isfinite(batch[key]).all()
    if cache:
        assert list((Path(cfg.cache_root) / "latents").iterdir()), "the latent cache was not built"


def test_a_300_character_name_is_a_problem_line_not_a_traceback(tmp_path):
    folder = _folder(tmp_path, ["ok.png"])
    _append(folder, json.dumps({"file_name": "a" * 300 + ".png", "text": "long"}).encode())
    _append(folder, json.dumps({"file_name": "d/" * 2100 + "x.png", "text": "deep"}).encode())

    problems = validate(folder)

    assert [(p.kind, p.line) for p in problems] == [("bad_name", 2), ("bad_name", 3)]
    assert "File name too long" in problems[0].message and "rename the file" in problems[0].message
    assert "(304 characters)" in str(problems[0])  # shortened on screen; the line number finds it
    run = _cli("validate", str(folder))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "metadata.jsonl line 2:" in run.stdout and "rename the file" in run.stdout
    with pytest.raises(MetadataError, match=r"line 2: .*File name too long"):
        load_captioned_images(folder, cache_dir=tmp_path / "cache")
    assert prepare(folder).missing_file == ["a" * 300 + ".png", "d/" * 2100 + "x.png"]


def test_prepare_on_a_line_that_is_not_utf8_names_the_line_like_validate(tmp_path):
    folder = _folder(tmp_path, ["ok.png"])
    _append(folder, b'{"file_name": "caf\xe9.png", "text": "latin-1"}')
    before = (folder / METADATA_FILE).read_bytes()

    run = _cli("prepare", str(folder))

    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "metadata.jsonl line 2: not UTF-8 text" in run.stderr and "re-save" in run.stderr
    assert (folder / METADATA_FILE).read_bytes() == before  # nothing lost
    assert [(p.kind, p.line) for p in validate(folder)] == [("bad_json", 2)]
    assert "not UTF-8 text" in str(validate(folder)[0])


def test_a_file_name_that_is_not_utf8_on_disk_is_reported_not_crashed_on(tmp_path):
    folder = _folder(tmp_path, ["ok.png"])
    raw = os.fsencode(folder) + b"/caf\xe9.png"  # a Latin-1 name, as old archives unpack
    shutil.copy(sample_data_dir() / SAMPLE, raw)
    odd = os.fsdecode(b"caf\xe9.png")

    report = prepare(folder)

    assert report.bad_name == [odd] and not report.added
    assert [e["file_name"] for e in read_metadata(folder)] == ["ok.png"]
    problems = validate(folder)
    assert [(p.kind, p.file_name) for p in problems] == [("bad_name", odd)]
    assert "rename the file" in problems[0].message
    _append(folder, b'{"file_name": "caf\\udce9.png", "text": "escaped"}')  # the same name, as JSON allows
    assert [(p.kind, p.line) for p in validate(folder)] == [("bad_json", 2), ("bad_name", None)]
    with pytest.raises(MetadataError, match=r"line 2: .*lone surrogate"):
        load_captioned_images(folder, cache_dir=tmp_path / "cache")


def _careless(folder: Path, case: str) -> bytes:
    """The bad line of ``case``, as a careless user writes it; the file it needs is made."""
    if case == "album.png":
        (folder / "album.png").mkdir()
    elif case == "loop.png":
        os.symlink("loop.png", folder / "loop.png")
    elif case == "number caption":
        shutil.copy(sample_data_dir() / SAMPLE, folder / "numbered.png")
    lines = {
        "album.png": {"file_name": "album.png", "text": "a folder"},
        "dotdot": {"file_name": "../data/ok.png", "text": "escapes"},
        "absolute": {"file_name": str(folder / "ok.png"), "text": "absolute"},
        "duplicate": {"file_name": "ok.png", "text": "again"},
        "nul": {"file_name": "a\u0000.png", "text": "nul"},
        "loop.png": {"file_name": "loop.png", "text": "loop"},
        "number caption": {"file_name": "numbered.png", "text": 5},
    }
    return json.dumps(lines[case]).encode()


EXPECTED = {
    "album.png": ("not_image", "is a folder"),
    "dotdot": ("outside_folder", "without '..'"),
    "absolute": ("outside_folder", "is an absolute path"),
    "duplicate": ("duplicate", "keep one of the lines"),
    "nul": ("bad_name", "NUL character"),
    "loop.png": ("unreadable", "symbolic links"),
    "number caption": ("no_caption", "must be a string"),
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_careless_lines_are_problems_in_validate_and_in_the_job(tmp_path, case):
    folder = _folder(tmp_path, ["ok.png"], stray=())
    _append(folder, _careless(folder, case))
    kind, words = EXPECTED[case]

    problems = validate(folder)

    assert [(p.kind, p.line) for p in problems] == [(kind, 2)]
    assert words in problems[0].message
    with pytest.raises(MetadataError, match=r"line 2: .*" + words.replace("(", r"\(")):
        load_captioned_images(folder, cache_dir=tmp_path / "cache")


def test_an_empty_caption_is_flagged_by_validate_and_still_loads(tmp_path):
    folder = _folder(tmp_path, ["ok.png", "blank.png"], stray=())
    lines = (folder / METADATA_FILE).read_text().replace('"jeans called blank.png"', '""')
    (folder / METADATA_FILE).write_text(lines)

    assert [p.kind for p in validate(folder)] == ["empty_caption"]
    assert load_captioned_images(folder, cache_dir=tmp_path / "cache")["text"] == ["", "jeans called ok.png"]


def test_prepare_matches_listed_names_as_validate_does(tmp_path):
    folder = _folder(tmp_path, ["ok.png"], stray=())
    (folder / METADATA_FILE).write_text(json.dumps({"file_name": "./ok.png", "text": "dotted"}) + "\n")

    report = prepare(folder)

    assert report.added == []  # not a second line for the same image, which validate would call a duplicate
    assert validate(folder) == []
