"""A static HTML gallery of a generation folder: ``gallery/index.html`` and its pages, opened from file://.

Written at every merge from ``manifest.jsonl``. Thumbnails (JPEG, atomically, remade only when their image is
newer) in pages of :data:`PAGE_SIZE`, with a heading wherever the group changes (template and slot values when
records have them, else the prompt); each image with its prompt, seed, scores, template and slots and the
command that re-makes it (record key ``remake``, when there is one). Rejected images get their own pages with
their reasons. A slot-value filter (plain JS in ``gallery.js``, no CDN, no request leaves the page) hides the
other cards and follows the page links.

Memory stays flat in the number of images: the manifest is read line by line twice (first for the counts,
the group list and the slot values, then for the pages) and one page is held at a time. Only the group and
slot-value lists grow, with the number of prompts, and both are capped in what the index shows.
"""

from __future__ import annotations

import html
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from sdcluster import atomic
from sdcluster.generate import filter as rejects
from sdcluster.paths import ASSETS

log = logging.getLogger(__name__)

GALLERY = "gallery"
PAGE_SIZE = 60
THUMB_SIDE = 192
MAX_LISTED_GROUPS = 500  # in index.html; the pages show every group heading whatever the count
MAX_SLOT_VALUES = 200  # per slot in the filter menu: beyond that a menu is no help
_STATIC = ("gallery.css", "gallery.js")


def image_records(image_manifest: Path) -> Iterator[dict[str, Any]]:
    """The image manifest's records one line at a time (:func:`sdcluster.atomic.iter_jsonl`), those that
    name an image ``file``."""
    return (record for record in atomic.iter_jsonl(image_manifest) if "file" in record)


def slots_of(record: dict[str, Any]) -> dict[str, Any]:
    """A record's slot values: ``labels`` as the prompt programs write them (``slots`` is read too)."""
    return record.get("labels") or record.get("slots") or {}


def group_key(record: dict[str, Any]) -> str:
    """What a heading shows: the template and its slot values when the record has them, else the prompt."""
    if record.get("template"):
        slots = slots_of(record)
        values = ", ".join(f"{k}={v}" for k, v in sorted(slots.items()))
        return f"{record['template']} [{values}]" if values else str(record["template"])
    return str(record.get("prompt", ""))


@dataclass
class _Survey:
    """Pass 1: what the index and every page's filter menu need, bounded by the number of groups."""

    page_size: int = PAGE_SIZE
    kept: int = 0
    rejected: int = 0
    groups: dict[str, list[int]] = field(default_factory=dict)  # key -> [images, first kept page]
    slots: dict[str, set[str]] = field(default_factory=dict)

    def add(self, record: dict[str, Any]) -> None:
        if "rejected" in record:
            self.rejected += 1
            return
        entry = self.groups.setdefault(group_key(record), [0, self.kept // self.page_size + 1])
        entry[0] += 1
        self.kept += 1
        for name, value in slots_of(record).items():
            values = self.slots.setdefault(str(name), set())
            if len(values) < MAX_SLOT_VALUES:
                values.add(str(value))


def _pages(count: int, size: int) -> int:
    return max(1, -(-count // size))


def _thumbnail(source: Path, dest: Path) -> None:
    """A small JPEG of ``source``; kept when it is newer than its image (a redone image gets a new one)."""
    try:  # one stat for the thumbnail, one for the image: a re-merge of 100,000 images does only these
        if dest.stat().st_mtime_ns >= source.stat().st_mtime_ns:
            return
    except FileNotFoundError:  # no thumbnail yet
        pass
    with Image.open(source) as image:
        small = image.convert("RGB")
    small.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85)
    atomic.write_bytes(dest, buffer.getvalue())


def _card(out_dir: Path, record: dict[str, Any]) -> str:
    e = html.escape
    source = rejects.image_path(out_dir, record)
    thumb = f"thumbs/{Path(record['file']).stem}.jpg"
    _thumbnail(source, out_dir / GALLERY / thumb)
    full = source.relative_to(out_dir).as_posix()
    rows = [f'<div class="prompt">{e(str(record.get("prompt", "")))}</div>']
    rows.append(f"<div>{e(record['file'])} &middot; seed {e(str(record.get('seed', '')))}</div>")
    if record.get("template"):
        rows.append(f"<div>template: {e(str(record['template']))}</div>")
    for name, value in sorted(slots_of(record).items()):
        rows.append(f'<div class="slot">{e(str(name))}: {e(str(value))}</div>')
    for name, value in sorted((record.get("scores") or {}).items()):
        rows.append(f'<div class="score">{e(str(name))}: {e(str(value))}</div>')
    if "rejected" in record:
        reason = ", ".join(f"{k}: {v}" for k, v in record["rejected"].items())
        rows.append(f'<div class="reason">rejected: {e(reason)}</div>')
    if record.get("remake"):
        rows.append(f"<code>{e(str(record['remake']))}</code>")
    slots = e(json.dumps(slots_of(record), sort_keys=True))
    kind = "card rejected" if "rejected" in record else "card"
    return (
        f'<div class="{kind}" data-slots="{slots}"><a href="../{e(full)}">'
        f'<img src="{e(thumb)}" alt="{e(record["file"])}"></a>{"".join(rows)}</div>'
    )


def _head(title: str) -> str:
    # the empty icon stops Chromium asking for /favicon.ico (an error in the console under file://)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<link rel="icon" href="data:,"><title>{html.escape(title)}</title>'
        '<link rel="stylesheet" href="gallery.css"><script src="gallery.js"></script></head><body>'
    )


def _filter_menu(survey: _Survey) -> str:
    if not survey.slots:
        return ""
    options = ['<option value="">all slot values</option>']
    for name in sorted(survey.slots):
        for value in sorted(survey.slots[name]):
            choice = html.escape(f"{name}={value}")
            options.append(f'<option value="{choice}">{choice}</option>')
    return f'<label>filter: <select id="slot-filter">{"".join(options)}</select></label>'


def _nav(prefix: str, number: int, total: int, survey: _Survey) -> str:
    links = ['<a href="index.html">index</a>']
    if number > 1:
        links.append(f'<a class="page" id="prev" href="{prefix}-{number - 1:04d}.html">&laquo; previous</a>')
    links.append(f"<span>page {number} of {total}</span>")
    if number < total:
        links.append(f'<a class="page" id="next" href="{prefix}-{number + 1:04d}.html">next &raquo;</a>')
    links += [_filter_menu(survey), '<span id="shown"></span>']
    return f"<nav>{''.join(links)}</nav>"


class _PageWriter:
    """Collects one page of cards at a time and writes it when full (or at the end)."""

    def __init__(self, out_dir: Path, prefix: str, title: str, total: int, survey: _Survey) -> None:
        self.out_dir, self.prefix, self.title, self.total, self.survey = out_dir, prefix, title, total, survey
        self.number, self.count = 1, 0
        self.cards: list[str] = []
        self.last_group: str | None = None

    def add(self, record: dict[str, Any]) -> None:
        key = group_key(record)
        if key != self.last_group:
            if self.last_group is not None:
                self.cards.append("</div></section>")
            self.cards.append(
                f'<section class="group"><h2 class="group">{html.escape(key)}</h2><div class="grid">'
            )
            self.last_group = key
        self.cards.append(_card(self.out_dir, record))
        self.count += 1
        if self.count == self.survey.page_size:
            self.flush()

    def flush(self) -> None:
        if self.number > self.total:
            return
        if self.last_group is not None:
            self.cards.append("</div></section>")
        title = f"{self.title}, page {self.number}"
        nav = _nav(self.prefix, self.number, self.total, self.survey)
        text = f"{_head(title)}<h1>{html.escape(title)}</h1>{nav}{''.join(self.cards)}</body></html>\n"
        atomic.write_text(self.out_dir / GALLERY / f"{self.prefix}-{self.number:04d}.html", text)
        self.number, self.cards, self.last_group, self.count = self.number + 1, [], None, 0


def _index(out_dir: Path, survey: _Survey) -> None:
    e = html.escape
    parts = [_head(f"gallery of {out_dir.name}"), f"<h1>Generated images: {e(str(out_dir))}</h1>"]
    pages = _pages(survey.kept, survey.page_size)
    parts.append(f'<p><a id="kept" href="page-0001.html">{survey.kept} kept images</a>, {pages} pages')
    if survey.rejected:
        parts.append(f' &middot; <a id="rejected" href="rejected-0001.html">{survey.rejected} rejected</a>')
    parts.append("</p><table><tr><th>group</th><th>images</th><th>first page</th></tr>")
    for key, (count, page) in list(survey.groups.items())[:MAX_LISTED_GROUPS]:
        link = f'<a href="page-{page:04d}.html">{page}</a>'
        parts.append(f"<tr><td>{e(key)}</td><td>{count}</td><td>{link}</td></tr>")
    parts.append("</table>")
    if len(survey.groups) > MAX_LISTED_GROUPS:
        parts.append(f"<p>and {len(survey.groups) - MAX_LISTED_GROUPS} more groups in the pages</p>")
    atomic.write_text(out_dir / GALLERY / "index.html", "".join(parts) + "</body></html>\n")


def write_gallery(out_dir: Path, manifest: Path | None = None, page_size: int = PAGE_SIZE) -> Path:
    """(Re)write ``gallery/`` of a merged generation folder; return its ``index.html``."""
    out_dir = Path(out_dir)
    manifest = manifest or out_dir / "manifest.jsonl"
    (out_dir / GALLERY / "thumbs").mkdir(parents=True, exist_ok=True)
    for name in _STATIC:
        atomic.write_bytes(out_dir / GALLERY / name, (ASSETS / GALLERY / name).read_bytes())
    survey = _Survey(page_size)
    for record in image_records(manifest):
        survey.add(record)
    kept = _PageWriter(out_dir, "page", "Kept images", _pages(survey.kept, page_size), survey)
    rejected = _PageWriter(out_dir, "rejected", "Rejected images", _pages(survey.rejected, page_size), survey)
    for record in image_records(manifest):
        (rejected if "rejected" in record else kept).add(record)
    kept.flush()
    if survey.rejected:
        rejected.flush()
    for prefix, total in (("page", kept.total), ("rejected", rejected.total if survey.rejected else 0)):
        for stale in (out_dir / GALLERY).glob(f"{prefix}-*.html"):  # pages of a larger earlier gallery
            if int(stale.stem.split("-")[1]) > total:
                stale.unlink(missing_ok=True)  # a concurrent merge removed it first
    _index(out_dir, survey)
    return out_dir / GALLERY / "index.html"
