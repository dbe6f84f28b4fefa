"""docs/reference/options.md is what the schema says today: a changed docstring, default or option fails."""

from __future__ import annotations

from sdcluster import schema_docs
from tests.conftest import REPO

PAGE = REPO / "docs" / "reference" / "options.md"


def test_options_reference_is_current() -> None:
    assert PAGE.read_text() == schema_docs.markdown(), (
        f"{PAGE.relative_to(REPO)} is stale. Fix: {schema_docs.REGENERATE}"
    )


def test_options_reference_lists_every_key_and_option() -> None:
    page = PAGE.read_text()
    missing = [k.name for s in schema_docs.sections() for k in s.keys if f"| `{k.name}` |" not in page]
    assert not missing, missing
    for group in schema_docs.groups():
        for option in schema_docs.group_options(group):
            assert f"{group}={option}`" in page, f"{group}={option}"
