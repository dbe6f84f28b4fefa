"""The cluster wing (``conf/cluster/``): from validated configs to jobs, and the jobs' side of the scheduler.

Login node: ``preflight`` checks everything checkable before anything is queued, ``submit`` turns N configs
into the jobs they mean (one task -> jobs table; launch is N=1, a sweep is N points) and submits them with
submitit, ``records`` keeps each job's ``jobs/<id>/job.json`` and the user's job index, ``scheduler`` asks
SLURM (sacct, squeue, sinfo) what it knows. Compute node: ``callables`` are what submitit runs (the same code
on every rank, no Hydra), ``distributed`` turns SLURM's environment into torch's, and ``requeue`` is the
preemption protocol (a flag in the signal handler, a collective save, requeue within budget). ``sandbox`` is a
real single-node SLURM on this machine for tests and trying things. What a job does is in
:mod:`sdcluster.train` and :mod:`sdcluster.generate`.
"""
