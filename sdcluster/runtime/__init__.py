"""The runtime wing: what runs inside a job, on the compute node.

``callables`` are what submitit runs (the same code on every rank, no Hydra): they set up logging and
``distributed`` (the scheduler's environment turned into torch's rendezvous and thread count), record the
attempt, run the work, and hand a preemption to ``requeue`` (a flag in the signal handler, a collective save
at a step boundary, requeue within budget). ``ownership`` keeps one writer per run folder: the login side
claims and checks it before queueing, the job enters it when it starts. ``step_events`` is the seam at the
loops' step and batch boundaries: observers that production never registers (tests, benchmarks, and the
``SDCLUSTER_TEST_PAUSE`` hold the callables register only when that variable is set).

May import: :mod:`sdcluster.config`, ``atomic``, ``paths``, and the base of the cluster wing
(:mod:`sdcluster.cluster.records`, the job's record; :mod:`sdcluster.cluster.backends`, the scheduler's
environment, answers and requeue; neither imports anything above config). data, models, train and generate
import this wing (a rank's decision, the preemption flag, the folder's holder); ``callables`` reaches up to
models, train and generate only inside the job (function-level imports), since the login side imports it
to pickle the callables.
"""
