"""The static gallery, opened from file:// in real headless Chromium (Debian's package, driven by Playwright).

``make test`` installs Chromium (``make browser-packages``); without it these tests fail, they do not skip: a
gallery nobody has rendered is not a tested gallery. A screenshot of each checked page is saved in the
test's tmp folder (pytest keeps the last three runs') and its path printed: nothing goes in the checkout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sdcluster.config import GenerateConfig
from sdcluster.config.generate import FilterConfig, ScoresConfig
from sdcluster.generate import gallery, records
from sdcluster.generate.images import sample_per_group
from sdcluster.generate.job import generate_images
from tests.generate.folders import make_folder, record
from tests.generate.test_generate import gen_cfg

COLORS, FITS = ("blue", "black", "white"), ("slim", "wide")
PAGE = 8


def rows() -> list[dict[str, Any]]:
    """6 templated prompts (color x fit) x 3 images, 2 plain prompts x 2; one low CLIP score per colour."""
    made = []
    for p, (color, fit) in enumerate((c, f) for c in COLORS for f in FITS):
        for i in range(3):
            clip = 0.05 if (fit, i) == ("wide", 2) else 0.3
            extra = {"template": "a {color} pair of {fit} jeans", "labels": {"color": color, "fit": fit}}
            made.append(record(p, i, prompt=f"a {color} pair of {fit} jeans", scores={"clip": clip}, **extra))
    for p in (6, 7):
        made += [record(p, i, prompt=f"plain <b>prompt</b> {p}", scores={"clip": 0.3}) for i in range(2)]
    for row in made:
        row["remake"] = f"python -m sdcluster.launch task=generate generate.only={row['file']}"
    return made


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = make_folder(tmp_path_factory.mktemp("gallery") / "gen", rows())
    gen = GenerateConfig(scores=ScoresConfig(clip=True), filter=FilterConfig(min_clip=0.1))
    records.merge_image_manifest(out, gen)
    gallery.write_gallery(out, page_size=PAGE)  # small pages, so paging is exercised with few images
    return out


def test_gallery_files_are_static_and_self_contained(folder: Path) -> None:
    site = folder / gallery.GALLERY
    kept, rejected = 19, 3  # 22 images, one low CLIP score per colour
    assert sorted(p.name for p in site.glob("page-*.html")) == [f"page-000{n}.html" for n in (1, 2, 3)]
    assert [p.name for p in site.glob("rejected-*.html")] == ["rejected-0001.html"]
    assert len(list((site / "thumbs").glob("*.jpg"))) == kept + rejected
    with Image.open(site / "thumbs" / "p0000-i0000.jpg") as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) <= gallery.THUMB_SIDE
    for page in site.glob("*.html"):
        text = page.read_text()
        assert "http://" not in text and "https://" not in text  # nothing is fetched from anywhere
        assert "<b>prompt</b>" not in text  # prompts are text, never markup
    index = (site / "index.html").read_text()
    assert f"{kept} kept images" in index and f"{rejected} rejected" in index
    assert "a {color} pair of {fit} jeans [color=black, fit=slim]" in index

    # fewer pages next time: the pages of the larger gallery go, the thumbnails stay
    gallery.write_gallery(folder, page_size=100)
    assert [p.name for p in site.glob("page-*.html")] == ["page-0001.html"]
    gallery.write_gallery(folder, page_size=PAGE)


def test_contact_sheet_samples_every_group_at_scale() -> None:
    keyed = [(f"group {g}", Path(f"{g}-{i}.png")) for g in range(3) for i in range(100)]
    assert sample_per_group(keyed[:10], max_tiles=10) == [path for _, path in keyed[:10]]
    picked = sample_per_group(keyed, max_tiles=30)
    assert len(picked) == 30
    assert [sum(p.name.startswith(f"{g}-") for p in picked) for g in range(3)] == [10, 10, 10]
    assert picked[:3] == [Path("0-0.png"), Path("0-10.png"), Path("0-20.png")]  # spread over the group
    many = [(g, Path(f"{g}.png")) for g in range(1000)]  # more groups than tiles: groups sampled too
    assert len(sample_per_group(many, max_tiles=50)) == 50


@pytest.fixture
def page(browser: Any, tmp_path: Path) -> Iterator[Any]:
    """A fresh page that records console errors, page errors and every request outside the folder."""
    tab = browser.new_page(viewport={"width": 1280, "height": 900})
    tab.screenshots = tmp_path / "screenshots"
    tab.problems = []
    tab.on("console", lambda m: m.type == "error" and tab.problems.append(f"console: {m.text}"))
    tab.on("pageerror", lambda error: tab.problems.append(f"page error: {error}"))
    tab.on("requestfailed", lambda r: tab.problems.append(f"request failed: {r.url}"))
    tab.on("request", lambda r: r.url.startswith("file://") or tab.problems.append(f"request: {r.url}"))
    yield tab
    tab.close()


def screenshot(tab: Any, name: str) -> None:
    tab.screenshots.mkdir(exist_ok=True)
    path = tab.screenshots / f"gallery-{name}.png"
    tab.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def visible_slots(tab: Any) -> list[dict[str, str]]:
    cards = tab.query_selector_all(".card")
    return [json.loads(card.get_attribute("data-slots")) for card in cards if card.is_visible()]


def test_pages_render_with_every_thumbnail_and_no_errors(folder: Path, page: Any) -> None:
    page.goto((folder / gallery.GALLERY / "index.html").as_uri())
    page.click("a#kept")
    page.wait_for_load_state("load")
    assert page.url.endswith("page-0001.html")
    images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
    assert len(images) == PAGE and all(done and width > 0 for done, width in images)
    first = page.query_selector(".card")
    text = first.inner_text()
    assert "a blue pair of slim jeans" in text and "seed 0" in text and "clip: 0.3" in text
    assert "phash:" in text and "generate.only=p0000-i0000.png" in text
    headings = page.eval_on_selector_all("h2.group", "els => els.map(e => e.textContent)")
    template = "a {color} pair of {fit} jeans"
    assert headings[:2] == [f"{template} [color=blue, fit=slim]", f"{template} [color=blue, fit=wide]"]
    full = page.get_attribute(".card a", "href")
    assert (folder / gallery.GALLERY / full).resolve() == folder / "p0000-i0000.png"
    screenshot(page, "page-1")
    assert page.problems == []


def test_filtering_by_a_slot_value_hides_the_others_and_follows_paging(folder: Path, page: Any) -> None:
    page.goto((folder / gallery.GALLERY / "page-0001.html").as_uri())
    before = visible_slots(page)
    assert {s.get("color") for s in before} > {"blue"}  # more than one colour on the page
    page.select_option("#slot-filter", "color=black")
    shown = visible_slots(page)
    assert shown and all(s == {"color": "black", "fit": s["fit"]} for s in shown)
    assert len(shown) < len(before)
    assert page.inner_text("#shown") == f"{len(shown)} of {PAGE} shown"
    assert all(
        section.is_visible() == ("color=black" in section.inner_text())
        for section in page.query_selector_all("section.group")
    )
    screenshot(page, "filtered")

    page.click("a#next")  # the filter goes with the page link
    page.wait_for_load_state("load")
    assert "page-0002.html" in page.url and page.input_value("#slot-filter") == "color=black"
    assert all(s["color"] == "black" for s in visible_slots(page))
    page.click("a#next")
    page.wait_for_load_state("load")
    assert "page-0003.html" in page.url and page.query_selector("a#next") is None
    assert visible_slots(page) == []  # the last page holds white and plain prompts only
    page.select_option("#slot-filter", "")
    assert len(visible_slots(page)) == len(page.query_selector_all(".card")) > 0
    page.click("a#prev")
    page.wait_for_load_state("load")
    assert "page-0002.html" in page.url
    assert page.problems == []


def test_rejected_images_have_their_own_pages_with_reasons(folder: Path, page: Any) -> None:
    page.goto((folder / gallery.GALLERY / "index.html").as_uri())
    page.click("a#rejected")
    page.wait_for_load_state("load")
    cards = page.query_selector_all(".card.rejected")
    assert len(cards) == 3 and all("reason: low_clip" in card.inner_text() for card in cards)
    widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
    assert len(widths) == 3 and min(widths) > 0
    assert (
        folder / gallery.GALLERY / page.get_attribute(".card a", "href")
    ).resolve().parent.name == "rejected"
    screenshot(page, "rejected")
    assert page.problems == []


@pytest.mark.slow
def test_gallery_of_a_real_generation_job(tiny_model: Path, tmp_path: Path, page: Any) -> None:
    out = generate_images(gen_cfg(tmp_path, tiny_model, num_images=2, batch_size=2)).out_dir
    page.goto((out / gallery.GALLERY / "index.html").as_uri())
    page.click("a#kept")
    page.wait_for_load_state("load")
    widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
    assert len(widths) == 4 and min(widths) > 0
    for row, card in zip(records.read_image_manifest(out), page.query_selector_all(".card"), strict=True):
        text = card.inner_text()
        assert row["prompt"] in text and f"seed {row['seed']}" in text and row["scores"]["phash"] in text
        if row.get("remake"):
            assert row["remake"] in text
    screenshot(page, "real-job")
    assert page.problems == []


def test_template_text_and_slot_values_are_text_never_markup(tmp_path: Path) -> None:
    """Templates and slot values come from a user's prompt program: shown as written, never as markup."""
    template, fit = "a {fit} pair <i>of</i> jeans", '<img src=x onerror="alert(1)">'
    made = [
        record(0, i, prompt=f"a {fit} pair <i>of</i> jeans", template=template, labels={"fit<b>": fit})
        for i in range(2)
    ]
    out = make_folder(tmp_path / "gen", made)
    records.merge_image_manifest(out, GenerateConfig())
    gallery.write_gallery(out, page_size=PAGE)
    pages = list((out / gallery.GALLERY).glob("*.html"))
    assert {p.name for p in pages} >= {"index.html", "page-0001.html"}
    for page in pages:
        text = page.read_text()
        for raw in ("<i>", "<img src=x", "<b>"):
            assert raw not in text, (page.name, raw)
    shown = (out / gallery.GALLERY / "page-0001.html").read_text()
    assert "a {fit} pair &lt;i&gt;of&lt;/i&gt; jeans" in shown  # the heading and the card's template line
    assert "fit&lt;b&gt;: &lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in shown  # the card's slot line
    assert 'value="fit&lt;b&gt;=&lt;img src=x' in shown  # the filter menu's option
