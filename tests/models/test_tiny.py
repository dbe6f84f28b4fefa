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


def test_each_embedded_model_s_family_is_known_without_building_it(cache_root):
    """The launch reads an embedded model's family from a table (a dry run builds nothing): the table must
    say what each builder writes into ``model_index.json``."""
    from sdcluster.models.embedded import BUILDERS, PIPELINES, embedded_family
    from sdcluster.models.family import family_of_folder

    assert PIPELINES.keys() == BUILDERS.keys()
    for name in BUILDERS:
        built = family_of_folder(ensure_tiny_model(cache_root, name))
        assert type(embedded_family(name)) is type(built), name
