"""Where a ``model.path`` points: an embedded model (``tiny``, ``tiny_sdxl``), a local folder, or a hub id.

Its own module because both the loader and the hub staging ask, and neither should import the other for it.
"""

from __future__ import annotations

import re
from pathlib import Path

from sdcluster.config.model import EMBEDDED  # built offline by models/tiny.py and models/tiny_sdxl.py

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_embedded(path: str) -> bool:
    return path in EMBEDDED


def is_local(path: str) -> bool:
    if is_embedded(path):
        return False
    return path.startswith(("/", ".", "~")) or Path(path).expanduser().exists()


def looks_like_hub_id(path: str) -> bool:
    """``owner/name`` as the hub spells repository ids (whether it exists is the staging's question)."""
    return bool(_HUB_ID.match(path))


def is_hub_id(path: str) -> bool:
    """A model the hub serves (``owner/name``), as opposed to ``tiny`` or a local folder."""
    return not is_embedded(path) and not is_local(path) and looks_like_hub_id(path)
