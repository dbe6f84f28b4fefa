"""sdcluster: fine-tune Stable Diffusion and mass-produce images as SLURM batch jobs.

``sdcluster --help`` lists the commands (``launch``, ``logs``, ``sweep``, ...); the package's modules are
described in README.md (Development).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    # The one source is pyproject.toml's version: an installed (or editable) package carries it.
    __version__ = version("sdcluster")
except PackageNotFoundError:  # a bare checkout on sys.path, never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
