"""One JSON-lines reader: the list, the stream, the image manifest's stream and the part index all see the
same records of the same file, whatever a kill or a hand edit left in it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from sdcluster import atomic
from sdcluster.generate import gallery, records
from sdcluster.generate.manifest_index import PartIndex


def _record(n: int, prompt: str = "a photo") -> dict[str, object]:
    return {"file": records.image_name(0, n), "prompt": prompt, "seed": n}


@pytest.fixture
def part(tmp_path: Path) -> Path:
    """A manifest part with everything a reader must get through, written the ways it can be written."""
    path = tmp_path / "shard-0-of-1.jsonl"
    atomic.append_jsonl(path, _record(0))
    with open(path, "a", encoding="utf-8") as fh:
        # a prompt with a line separator, written unescaped (as ``ensure_ascii=False`` writers do): one line
        fh.write(json.dumps(_record(1, "left\u2028right"), ensure_ascii=False) + "\n")
        fh.write("\n")  # blank
        fh.write('["not", "an", "object"]\n')
        fh.write('{"file": "p0000-i00')  # torn by a kill mid-append ...
    atomic.append_jsonl(path, _record(2))  # ... and closed by the next append
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(_record(3)))  # a complete last record whose newline is not written yet
    return path


EXPECTED = ["p0000-i0000.png", "p0000-i0001.png", "p0000-i0002.png", "p0000-i0003.png"]


def test_every_reader_sees_the_same_records(part: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        listed = atomic.read_jsonl(part)
    # a set: after some other tests the capture handler sees each record twice (a handler on "sdcluster" too)
    warnings = {r.getMessage() for r in caplog.records}
    assert warnings == {f"{part}:5: skipping an incomplete line (interrupted write)"}  # the torn line only
    assert [r["file"] for r in listed] == EXPECTED
    assert listed[1]["prompt"] == "left\u2028right"
    assert [r["file"] for r in atomic.iter_jsonl(part)] == EXPECTED
    assert [r["file"] for r in gallery.image_records(part)] == EXPECTED
    assert [r["file"] for r in PartIndex([part]).records()] == EXPECTED


def test_offsets_point_at_the_lines_they_were_read_from(part: Path) -> None:
    with open(part, "rb") as fh:
        for offset, record in atomic.iter_jsonl_at(part):
            fh.seek(offset)
            assert json.loads(fh.readline()) == record


def test_a_missing_file_has_no_records(tmp_path: Path) -> None:
    assert atomic.read_jsonl(tmp_path / "none.jsonl") == []
    assert list(gallery.image_records(tmp_path / "none.jsonl")) == []
