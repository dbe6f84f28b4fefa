"""The sweep wing: Hydra multirun points submitted together, and what to do with them afterwards.

``python -m sdcluster.launch -m +cluster=slurm optim.lr=1e-5,5e-6`` reaches :mod:`~sdcluster.sweep.points`
through Hydra's launcher plugin (``hydra_plugins/sdcluster_launcher``): every point is composed and
validated on the login node first, then all are handed to the one submission path
(:func:`sdcluster.cluster.submit.submit_configs`) and recorded in ``outputs/sweeps/<id>/sweep.json``
(``ledger``). ``report`` tabulates and plots the points from their runs' own files; ``python -m
sdcluster.sweep report|resubmit`` is the command line.

Above the login side of the cluster wing; only ``logs`` and the command line import it.

May import: ``cluster``, ``config``, ``status``, ``train.metrics``, ``atomic``, ``identity``, ``paths``,
``progress``.
"""
