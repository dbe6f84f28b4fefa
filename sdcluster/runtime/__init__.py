"""The runtime wing: what runs inside a job, on the compute node.

``callables`` are what submitit runs (the same code on every rank, no Hydra): they set up logging and
``distributed`` (the scheduler's environment turned into torch's rendezvous and thread count), record the
attempt, run the work, and hand a preemption to ``requeue`` (a flag in the signal handler, a collective save
at a step boundary, requeue within budget). ``ownership`` keeps one writer per run folder: the login side
claims and checks it before queueing, the job enters it when it starts. ``step_events`` is the seam at the
loops' step and batch boundaries: observers that production never registers (tests, benchmarks, and the
``SDCLUSTER_TEST_PAUSE`` hold the callables register only when that variable is set).

Two floors. The base (everything but ``callables``) reads the base of the cluster wing (the job's record
in ``cluster.records``; the scheduler's environment, answers and requeue in ``cluster.backends``; neither
imports anything above config), and data, generate and train import it (a rank's decision, the preemption
flag, the folder's holder, the step events). ``callables``, the job's entry point, reaches up to models,
train and generate only inside the job (function-level imports), since the login side imports it to pickle
the callables.

May import (job entry: callables): ``runtime``, ``train``, ``generate``, ``data``, ``models``,
``cluster.records``, ``cluster.backends``, ``config``, ``atomic``, ``derive``, ``model_source``, ``paths``.

May import (base): ``cluster.records``, ``cluster.backends``, ``config``, ``atomic``, ``derive``,
``identity``, ``model_source``, ``paths``.
"""
