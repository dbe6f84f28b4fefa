"""sdcluster: fine-tune Stable Diffusion and mass-produce images as SLURM batch jobs.

``sdcluster --help`` lists the commands (``launch``, ``logs``, ``sweep``, ...); the package's modules are
described in README.md (Development).

Words that mean one thing each in the code (config keys keep the names users type):

- **scheduler**: the cluster's job scheduler (SLURM, or none for a local job), reached only through
  :mod:`sdcluster.cluster.backends`.
- **sampler**: the sampling algorithm of generation and validation images, chosen by ``generate.scheduler``
  (:mod:`sdcluster.models.samplers`); in diffusers it is a noise-scheduler class.
- **noise scheduler**: diffusers' scheduler object a model carries (betas, timesteps, prediction type),
  used to add noise in training and built anew as a sampler for generation.
- **LR schedule**: the optimizer's learning-rate curve, ``optim.lr_schedule`` (diffusers' ``get_scheduler``).
- **checkpoint manifest**: ``sdcluster-checkpoint.json`` of a ``step-N`` folder, its sealed file list and step
  (:mod:`sdcluster.train.step_folders`).
- **latent-cache manifest**: ``manifest.json`` of a latent-cache entry, what its rows are and its sealed file
  list (:mod:`sdcluster.data.latent_cache`).
- **image manifest**: ``manifest.jsonl`` of a generation folder, one record per image, merged from the
  shards' parts (:mod:`sdcluster.generate.records`).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    # The one source is pyproject.toml's version: an installed (or editable) package carries it.
    __version__ = version("sdcluster")
except PackageNotFoundError:  # a bare checkout on sys.path, never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
