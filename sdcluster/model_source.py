"""What kind of source a model path names: an embedded model (``tiny``, ``tiny_sdxl``), a local folder, or a
hub id. Decided here, once: the schema's checks, the path absolutizing, the run and latent-cache identity,
the loader and the hub staging all ask these functions, so a path is never a folder to one of them and a hub
id to another.

At the bottom of the package, below config and paths: it imports nothing from sdcluster.
"""

from __future__ import annotations

import re
from pathlib import Path

EMBEDDED = ("tiny", "tiny_sdxl", "tiny_sd3", "tiny_flux")
"""The ``model.path`` values that build a random-weight model offline (``models/tiny.py``,
``models/tiny_sdxl.py``, ``models/tiny_sd3.py``, ``models/tiny_flux.py``) instead of loading one."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_embedded(path: str) -> bool:
    """One of :data:`EMBEDDED`."""
    return path in EMBEDDED


def is_local(path: str) -> bool:
    """A folder on this machine: spelled as a path (``/``, ``.``, ``~``) or an existing one. Spelled as a
    path but missing is still local, so the error names a missing folder rather than a bad hub id."""
    if is_embedded(path):
        return False
    return path.startswith(("/", ".", "~")) or Path(path).expanduser().exists()


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
"""A local model path ending in one of these is a single-file checkpoint (the original Stable Diffusion
layout), not a diffusers folder; a ``.ckpt`` is recognised only to be refused (a pickle)."""


def is_single_file(path: str) -> bool:
    """A local single-file checkpoint (:data:`SINGLE_FILE_SUFFIXES`), as ComfyUI and A1111 load them."""
    return is_local(path) and Path(path).suffix.lower() in SINGLE_FILE_SUFFIXES


def looks_like_hub_id(path: str) -> bool:
    """``owner/name`` as the hub spells repository ids (whether it exists is the staging's question)."""
    return bool(_HUB_ID.match(path))


def is_hub_id(path: str) -> bool:
    """A model the hub serves (``owner/name``), as opposed to ``tiny`` or a local folder."""
    return not is_embedded(path) and not is_local(path) and looks_like_hub_id(path)
