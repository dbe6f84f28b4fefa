"""The ``model`` group (``conf/model/``): which Stable Diffusion to start from."""

from __future__ import annotations

from dataclasses import dataclass

from sdcluster.config.checks import _require


@dataclass
class ModelConfig:
    """Which Stable Diffusion to start from.

    ``path`` is a local diffusers folder or a hub id; the special value ``tiny`` builds the embedded
    random-weight model offline (tests and the default run), so no code path knows which one it got.
    """

    name: str = "tiny"
    """Short name of the model; names the run folder (``outputs/runs/<name>-<hash>``) unless run_name does."""
    path: str = "tiny"
    """A local diffusers folder or a hub id to fine-tune; ``tiny``: the random-weight model built offline."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin the weights to, for a reproducible run; null: main."""
    variant: str | None = None
    """Weight files variant, e.g. ``fp16`` (half the download); null: the full-precision files."""

    def __post_init__(self) -> None:
        _require(bool(self.path), "model.path", "is empty", "give a local diffusers folder or a hub id")
