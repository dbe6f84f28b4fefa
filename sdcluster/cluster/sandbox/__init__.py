"""A real single-node SLURM cluster on this machine, for the test suite and for trying sdcluster.

Run as root (slurmd must be able to start jobs as any user)::

    python -m sdcluster.cluster.sandbox start            # idempotent: reuses a healthy sandbox in < 2 s
    eval "$(python -m sdcluster.cluster.sandbox env)"    # export SLURM_CONF=... for sbatch/sinfo/submitit
    python -m sdcluster.cluster.sandbox status           # sinfo
    python -m sdcluster.cluster.sandbox stop

Needs the Debian/Ubuntu packages listed in ``APT_PACKAGES`` (tested with SLURM 22.05, MariaDB 10.11).

Everything lives under one state dir (``/tmp/sdcluster-slurm``, or ``--dir`` / ``$SDCLUSTER_SLURM_DIR``):
config, a private munged, a private MariaDB, slurmdbd, slurmctld, slurmd, their pid files, logs and
state. Nothing under /etc is touched and no system daemon is reused, so the sandbox can sit next to a real
SLURM or MariaDB install, ``stop`` leaves no process behind, and deleting the dir is a full reset.

Accounting (slurmdbd + MariaDB) is not optional here: without it ``sacct`` fails and submitit silently
falls back to guessing job states, which is exactly the behaviour the tests must not depend on.
"""

from sdcluster.cluster.sandbox.daemons import is_running, resolve_dir, start, stop
from sdcluster.cluster.sandbox.spec import APT_PACKAGES, DEFAULT_DIR, PARTITIONS, SandboxError, SandboxInfo

__all__ = [
    "APT_PACKAGES",
    "DEFAULT_DIR",
    "PARTITIONS",
    "SandboxError",
    "SandboxInfo",
    "is_running",
    "resolve_dir",
    "start",
    "stop",
]
