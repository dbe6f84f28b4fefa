"""prepare/validate of metadata.jsonl, and the ``python -m sdcluster.data`` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdcluster.data import METADATA_FILE, MetadataError, prepare, read_metadata, validate, write_metadata
from sdcluster.paths import sample_data_dir

REPO = Path(__file__).resolve().parents[1]


def _image(path: Path, size: tuple[int, int] = (20, 20), noise: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
    else:
        image = Image.new("RGB", size, (40, 60, 120))
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}[path.suffix.lower()]
    image.save(path, format=fmt)
    return path


def _write_lines(folder: Path, lines: list[str]) -> None:
    (folder / METADATA_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, "-m", "sdcluster.data", *args], capture_output=True, text=True, cwd=REPO, env=env
    )


def test_prepare_lists_every_image_and_keeps_captions(tmp_path: Path) -> None:
    for name in ("11 (3).JPG", "11 (10).jpg", "a.png", "b.webp", "C.PNG", ".hidden/x.png"):
        _image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    write_metadata(
        tmp_path, [{"file_name": "a.png", "text": "kept"}, {"file_name": "gone.png", "text": "old"}]
    )

    report = prepare(tmp_path)

    entries = read_metadata(tmp_path)
    names = [e["file_name"] for e in entries]
    assert names == ["11 (3).JPG", "11 (10).jpg", "a.png", "b.webp", "C.PNG", "gone.png"]
    captions = {e["file_name"]: e["text"] for e in entries}
    assert captions["a.png"] == "kept"
    assert captions["gone.png"] == "old"
    assert captions["b.webp"] == ""
    assert report.entries == 6
    assert sorted(report.added) == sorted(["11 (3).JPG", "11 (10).jpg", "b.webp", "C.PNG"])
    assert sorted(report.missing_caption) == sorted(report.added)
    assert report.missing_file == ["gone.png"]
    assert report.written


def test_prepare_twice_does_not_rewrite(tmp_path: Path) -> None:
    _image(tmp_path / "11 (1).JPG")
    prepare(tmp_path)
    path = tmp_path / METADATA_FILE
    os.utime(path, (1_000_000, 1_000_000))
    before = path.read_bytes()

    report = prepare(tmp_path)

    assert not report.written
    assert path.read_bytes() == before
    assert path.stat().st_mtime == 1_000_000
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_prepare_merges_duplicate_lines_keeping_the_caption(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    _write_lines(tmp_path, ['{"file_name": "a.png", "text": ""}', '{"file_name": "a.png", "text": "real"}'])

    report = prepare(tmp_path)

    assert read_metadata(tmp_path) == [{"file_name": "a.png", "text": "real"}]
    assert report.missing_caption == []


def test_prepare_refuses_to_rewrite_a_malformed_file(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    _write_lines(tmp_path, ['{"file_name": "a.png", "text": "ok"}', "{broken"])
    before = (tmp_path / METADATA_FILE).read_bytes()

    with pytest.raises(MetadataError, match="line 2"):
        prepare(tmp_path)
    assert (tmp_path / METADATA_FILE).read_bytes() == before


def test_shipped_sample_is_valid() -> None:
    assert validate(sample_data_dir()) == []


def test_validate_without_metadata(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    problems = validate(tmp_path)
    assert [p.kind for p in problems] == ["no_metadata"]
    assert "prepare" in problems[0].message


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    for name in ("good.png", "nocap.png", "empty.png", "extra (1).webp"):
        _image(folder / name)
    _image(folder / "big.png", size=(40, 40))
    _image(tmp_path / "outside.png")
    truncated = _image(folder / "truncated.png", size=(30, 30), noise=True)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    (folder / "garbage.JPG").write_bytes(b"this is not a jpeg" * 10)
    entries = [
        {"file_name": "good.png", "text": "fine"},
        "{not json",
        {"text": "no file name"},
        {"file_name": "nocap.png"},
        {"file_name": "empty.png", "text": "   "},
        {"file_name": "missing.png", "text": "x"},
        {"file_name": "truncated.png", "text": "x"},
        {"file_name": "garbage.JPG", "text": "x"},
        {"file_name": "big.png", "text": "x"},
        {"file_name": "./good.png", "text": "again"},
        {"file_name": "../outside.png", "text": "x"},
        {"file_name": str(tmp_path / "outside.png"), "text": "x"},
        [1, 2],
        "",
    ]
    _write_lines(folder, [e if isinstance(e, str) else json.dumps(e) for e in entries])
    return folder


def test_validate_finds_every_problem_with_its_line(broken: Path, tmp_path: Path) -> None:
    problems = validate(broken, max_pixels=1000)

    found = {(p.kind, p.line, p.file_name) for p in problems}
    assert found == {
        ("bad_json", 2, None),
        ("no_file_name", 3, None),
        ("no_caption", 4, "nocap.png"),
        ("empty_caption", 5, "empty.png"),
        ("missing_file", 6, "missing.png"),
        ("unreadable", 7, "truncated.png"),
        ("unreadable", 8, "garbage.JPG"),
        ("too_large", 9, "big.png"),
        ("duplicate", 10, "./good.png"),
        ("outside_folder", 11, "../outside.png"),
        ("outside_folder", 12, str(tmp_path / "outside.png")),
        ("not_object", 13, None),
        ("unlisted", None, "extra (1).webp"),
    }
    assert len(problems) == len(found)
    assert all(p.message for p in problems)
    assert "line 9" in str(next(p for p in problems if p.kind == "too_large"))


def test_validate_pixel_limit_is_a_parameter(broken: Path) -> None:
    kinds = [p.kind for p in validate(broken, max_pixels=40_000_000)]
    assert "too_large" not in kinds
    assert "unreadable" in kinds


def test_cli_validate_ok_on_sample() -> None:
    result = _run_cli("validate", str(sample_data_dir()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"OK: {len(read_metadata(sample_data_dir()))} images"


def test_cli_validate_prints_every_problem_and_fails(broken: Path) -> None:
    result = _run_cli("validate", str(broken), "--max-pixels", "1000")
    assert result.returncode == 1
    assert len(result.stdout.strip().splitlines()) == 13
    assert "line 6: 'missing.png'" in result.stdout


def test_cli_prepare_reports_missing_captions(tmp_path: Path) -> None:
    _image(tmp_path / "11 (1).JPG")
    result = _run_cli("prepare", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "1 entries" in result.stdout
    assert "needs a caption: 11 (1).JPG" in result.stdout
    assert _run_cli("validate", str(tmp_path)).returncode == 1  # the caption is still empty


def test_validate_decodes_a_large_folder_over_processes_and_says_the_same(
    tmp_path: Path, monkeypatch
) -> None:
    """Above ``PARALLEL_FROM`` images the decoding is split over worker processes: the problems (which line,
    which file, in file order) are exactly those of decoding in this process."""
    from sdcluster.data import reader

    count = reader.PARALLEL_FROM + 100
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        name = f"{i:05d}.png"
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / name)
        lines.append({"file_name": name, "text": "" if i == 7 else f"image {i}"})
    write_metadata(tmp_path, lines)
    for broken in (1500, count - 1):  # truncated: opens, fails on its pixels
        path = tmp_path / f"{broken:05d}.png"
        path.write_bytes(path.read_bytes()[:-40])
    import concurrent.futures

    pools = []
    real = concurrent.futures.ProcessPoolExecutor
    monkeypatch.setattr(reader.os, "sched_getaffinity", lambda pid: {0, 1})  # two CPUs, whatever runs this
    monkeypatch.setattr(
        concurrent.futures, "ProcessPoolExecutor", lambda *a, **k: pools.append(a) or real(*a, **k)
    )
    parallel = [(p.kind, p.line, p.file_name) for p in validate(tmp_path)]
    assert pools and pools[0][0] >= 2  # the workers did decode
    monkeypatch.setattr(reader, "PARALLEL_FROM", 10**9)
    serial = [(p.kind, p.line, p.file_name) for p in validate(tmp_path)]
    assert parallel == serial
    assert [(kind, line) for kind, line, _ in parallel] == [
        ("empty_caption", 8),
        ("unreadable", 1501),
        ("unreadable", count),
    ]
