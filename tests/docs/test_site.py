"""The docs site builds from docs/ with every link and anchor resolved, and its journey pages render."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

GUIDES = sorted((REPO / "docs" / "guides").glob("*.md"))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mkdocs build --strict`` into a tmp folder: a broken link or anchor is a warning, and fails it."""
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr}"
    return out


def test_every_page_is_in_the_nav_and_built(site: Path) -> None:
    pages = sorted(p.relative_to(REPO / "docs").with_suffix(".html") for p in (REPO / "docs").rglob("*.md"))
    assert pages and all((site / page).is_file() for page in pages)
    nav = (REPO / "mkdocs.yml").read_text()
    missing = [str(p.with_suffix(".md")) for p in pages if str(p.with_suffix(".md")) not in nav]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.stem)
def test_journey_page_renders_its_title_and_commands(site: Path, browser: Any, guide: Path) -> None:
    title = re.search(r"^# (.+)$", guide.read_text(), re.MULTILINE)[1]
    tab = browser.new_page()
    # The theme's own scripts raise on file:// (its keyboard-help modal), so page errors are not asserted;
    # what must hold is that the page needs nothing from the network: compute clusters are often offline.
    remote: list[str] = []
    tab.on("request", lambda r: r.url.startswith("file://") or remote.append(r.url))
    tab.goto((site / "guides" / f"{guide.stem}.html").as_uri())
    assert tab.locator("h1").first.inner_text().strip() == title
    code = tab.locator("pre code")
    assert code.count() >= 1 and code.first.is_visible()
    assert any("sdcluster " in text for text in code.all_inner_texts())  # the guide's commands, rendered
    assert not remote, f"fetched from the network: {remote}"
    tab.close()


def test_readme_is_a_landing_page_whose_links_resolve() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 200, "README.md is the landing page: move detail into docs/"
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    guides = {f"docs/guides/{p.name}" for p in GUIDES}
    assert guides <= set(links), f"journeys missing from README's table: {sorted(guides - set(links))}"
    assert all((REPO / link).is_file() for link in links), [x for x in links if not (REPO / x).is_file()]
