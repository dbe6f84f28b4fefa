"""sdcluster: fine-tune Stable Diffusion and mass-produce images as SLURM batch jobs.

``sdcluster --help`` lists the commands (``launch``, ``logs``, ``sweep``, ...); docs/architecture.md (Module
map) says what every module does.

The package is eight wings (``config``, ``models``, ``data``, ``generate``, ``train``, ``runtime``,
``cluster``, ``sweep``, each ``__init__`` saying what lives there and what it may import) and the top-level
modules below, in floors: imports go only downward. At the bottom, importing nothing of sdcluster:
``atomic`` (crash-safe writes), ``derive`` (numbers from a hash of their inputs), ``identity`` (what a run's,
a generation's and a latent-cache entry's hash covers; it reads the schema's classes only for type checks),
``model_source`` (what kind of source a model path names) and ``progress`` (log lines). Beside the schema:
``paths`` (where every file goes), ``redaction`` (tokens kept out), ``sealed`` (folders that list their own
files), ``schema_docs`` (every key's meaning) and ``compose`` (conf/ to a checked config). Then ``status``
(every recent job at a glance), and on top the entry points: ``launch``, ``logs``, ``cli`` (with
``__main__``) and ``completion``.

May import (bottom: atomic, derive, identity, model_source, progress): nothing of sdcluster.

May import (beside the schema: paths, redaction, sealed, schema_docs): ``config``, ``atomic``,
``identity``, ``model_source``.

May import (composition: compose): ``config``, ``paths``, ``redaction``.

May import (memory plan: plan): ``config``, ``models``, ``compose``, ``model_source``, ``paths``.

May import (job table: status): ``cluster.backends``, ``cluster.records``, ``train.metrics``, ``atomic``,
``paths``.

May import (entry points: launch, logs, cli, __main__, completion): ``cluster``, ``sweep``, ``status``,
``config``, ``compose``, ``schema_docs``, ``train.metrics``, ``data.__main__``, ``generate.__main__``,
``models.__main__``, ``atomic``, ``paths``, ``redaction``.

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
