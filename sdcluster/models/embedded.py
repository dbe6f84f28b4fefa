"""The embedded models (``model.path=tiny``, ``tiny_sdxl``, ``tiny_sd3``, ``tiny_flux``): found in the cache,
or built once.

The builders are :mod:`sdcluster.models.tiny` (Stable Diffusion 1.x-shaped),
:mod:`sdcluster.models.tiny_sdxl`, :mod:`sdcluster.models.tiny_sd3` and :mod:`sdcluster.models.tiny_flux`;
this module only decides where each lives and makes a copy appear whole.

    python -m sdcluster.models.embedded [CACHE_ROOT] [tiny|tiny_sdxl|tiny_sd3|tiny_flux]   # build or find
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from sdcluster import atomic
from sdcluster.models import tiny, tiny_flux, tiny_sd3, tiny_sdxl
from sdcluster.models.family import Family, family_of_folder, family_of_index
from sdcluster.paths import tiny_model_dir

BUILDERS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "tiny": (tiny.TINY_VERSION, tiny.build_tiny_pipeline),
    "tiny_sdxl": (tiny_sdxl.TINY_SDXL_VERSION, tiny_sdxl.build_tiny_sdxl),
    "tiny_sd3": (tiny_sd3.TINY_SD3_VERSION, tiny_sd3.build_tiny_sd3),
    "tiny_flux": (tiny_flux.TINY_FLUX_VERSION, tiny_flux.build_tiny_flux),
}

PIPELINES: dict[str, str] = {
    "tiny": "StableDiffusionPipeline",
    "tiny_sdxl": "StableDiffusionXLPipeline",
    "tiny_sd3": "StableDiffusion3Pipeline",
    "tiny_flux": "FluxPipeline",
}
"""The pipeline class each builder writes into ``model_index.json``: its family is known without building
it (a dry run writes nothing)."""


def embedded_family(name: str) -> Family:
    """The family of the embedded model ``name``, as its built folder would say."""
    return family_of_index({"_class_name": PIPELINES[name]}, name)


def ensure_tiny_model(cache_root: Path | str, name: str = "tiny") -> Path:
    """Return the cached embedded model ``name`` (one of :data:`BUILDERS`), building it first if needed.

    Built under a temporary name and published in one rename, so concurrent jobs (ranks, sweep points) never
    see a half-written model; a loser of the race keeps the winner's copy and discards its own.
    """
    version, build = BUILDERS[name]
    dest = tiny_model_dir(cache_root, name) / f"v{version}"
    if is_complete(dest):
        return dest
    # torch and safetensors report a full disk in their own words (SafetensorError): say it plainly
    with atomic.explain_disk_full(dest, resume=": the model is built again", setting="cache_root"):
        tmp = atomic.staging_dir(dest)
        try:
            build(tmp)
            if not is_complete(tmp):
                raise RuntimeError(f"the tiny model built in {tmp} lacks weight files (see load_components)")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # a broken copy is replaced, a good one kept
        atomic.publish_dir(tmp, dest, replace=not is_complete(dest))
    return dest


def is_complete(folder: Path) -> bool:
    """The marker (written last) and a weights file in every folder the model's family loads weights from:
    what a loader will open."""
    if not (folder / tiny.MARKER).is_file():
        return False
    try:
        parts = family_of_folder(folder).weighted_parts()
    except (OSError, ValueError):  # no readable model_index.json: not a copy a loader could open
        return False
    return all(any((folder / sub).glob("*.safetensors")) for sub in parts)


if __name__ == "__main__":
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".cache/sdcluster")
    print(ensure_tiny_model(root, sys.argv[2] if len(sys.argv) > 2 else "tiny"))
