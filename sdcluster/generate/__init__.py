"""The generation wing: ``P prompts x N images`` as reproducible, shardable, restartable jobs.

``plan`` decides what to make (items, seeds, shards), ``render`` turns one batch into pixels with diffusers,
``records`` owns a generation folder's files (images, manifest parts, merged manifest) and merges them by
streaming through ``manifest_index`` (20 bytes a record), ``images`` draws image grids (the contact sheet
here, validation grids in training), ``scores``/``duplicates``/``filter`` judge the images, and ``job``
composes them into the job function. Submission lives in :mod:`sdcluster.cluster`, the model loading in
:mod:`sdcluster.models`. Nothing is imported here, so ``python -m sdcluster.generate`` and the login node
stay light.

Above models and data (a finished folder is written as a dataset), with the runtime's base (the folder's
holder, the batch boundaries); below train, whose validation draws its images with ``render``.

May import: ``config``, ``models``, ``data``, ``runtime.distributed``, ``runtime.ownership``,
``runtime.requeue``, ``runtime.step_events``, ``atomic``, ``derive``, ``identity``, ``model_source``,
``paths``, ``progress``, ``sealed``.
"""
