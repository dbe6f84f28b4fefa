"""The cluster wing (``conf/cluster/``), the login side: from validated configs to queued jobs.

``preflight`` checks everything checkable before anything is queued, ``submit`` turns N configs into the
jobs they mean (one task -> jobs table; launch is N=1, a sweep is N points) and submits them with submitit,
``dry_run`` prints what would be submitted, ``submit_and_wait`` is what ``python -m sdcluster.launch`` does
with one config (check, submit, wait), ``interrupts`` makes Ctrl-C stop foreground jobs cleanly. What runs
inside a job is in :mod:`sdcluster.runtime`; what a job does is in :mod:`sdcluster.train` and
:mod:`sdcluster.generate`. The SLURM sandbox for tests and trying things is ``tests/sandbox`` (not shipped).

Two floors. The base: ``records`` (each job's ``jobs/<id>/job.json`` and the user's job index; imports only
``atomic`` and ``paths``) and ``backends`` (one protocol, a module per scheduler: submission, state queries,
checks, the job's environment; imports only config and submitit). Both sides read the base, the runtime wing
included. The login floor (``preflight``, ``submit``, ``dry_run``, ``submit_and_wait``, ``interrupts``,
``choice``) sits above runtime, data, models, train and generate and may import them; only the entry points
(``launch``, ``logs``, ``status``, ``sweep``) import it. ``callables`` is the old path of
:mod:`sdcluster.runtime.callables`, kept so that jobs pickled before the move still load.

May import (base: records, backends): ``config``, ``atomic``, ``derive``, ``identity``, ``model_source``,
``paths``.

May import (login side): ``cluster.records``, ``cluster.backends``, ``config``, ``models``, ``data``,
``generate``, ``train``, ``runtime``, ``plan``, ``atomic``, ``derive``, ``identity``, ``model_source``,
``paths``, ``progress``, ``redaction``, ``sealed``.
"""
