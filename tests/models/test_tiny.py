"""The embedded tiny model is published whole: a broken copy in the cache is rebuilt, never loaded."""

from __future__ import annotations

import shutil

from sdcluster.models.embedded import ensure_tiny_model, is_complete


def test_a_copy_with_an_empty_weights_folder_is_rebuilt(tmp_path, tiny_model):
    """What two ranks once left behind: the marker written, ``text_encoder/`` without weights."""
    dest = ensure_tiny_model(tmp_path)  # fresh cache: built once
    assert is_complete(dest)
    for weights in (dest / "text_encoder").glob("*.safetensors"):
        weights.unlink()
    assert not is_complete(dest)
    again = ensure_tiny_model(tmp_path)
    assert again == dest and is_complete(dest)
    assert sorted(p.name for p in (dest / "text_encoder").iterdir()) == sorted(
        p.name for p in (tiny_model / "text_encoder").iterdir()
    )
    assert not list(dest.parent.glob(".tmp-*")) and not list(dest.parent.glob(".old-*")), "no leftovers"
    shutil.rmtree(dest)
