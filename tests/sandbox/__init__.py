"""A real SLURM cluster on this machine (one node, or several in network namespaces), for the test suite
and for trying sdcluster (``make cluster``).

It lives in ``tests/`` and not in the installed package: a user's cluster is their site's, so a wheel has no
use for ~900 lines of daemon management. ``tests/`` rather than a new top-level ``tools/`` package: the suite
is its first user, lint and format already cover ``tests/``, and no generic top-level name (``tools``) joins
``sys.path`` next to an editable install. Run it from the checkout (``python -m tests.sandbox``).

Run as root (slurmd must be able to start jobs as any user)::

    python -m tests.sandbox start            # idempotent: reuses a healthy sandbox in < 2 s
    eval "$(python -m tests.sandbox env)"    # export SLURM_CONF=... for sbatch/sinfo/submitit
    python -m tests.sandbox status           # sinfo
    python -m tests.sandbox stop

    python -m tests.sandbox start --nodes 2  # two nodes n1, n2 (own hostname and address each)

Needs the Debian/Ubuntu packages listed in ``APT_PACKAGES`` (tested with SLURM 22.05, MariaDB 10.11).

Everything lives under one state dir (``/tmp/sdcluster-slurm``, or ``--dir`` / ``$SDCLUSTER_SLURM_DIR``):
config, a private munged, a private MariaDB, slurmdbd, slurmctld, slurmd, their pid files, logs and
state. Nothing under /etc is touched (but for the multi-node sandbox's ``/etc/hosts`` lines) and no
system daemon is reused, so the sandbox can sit next to a real SLURM or MariaDB install, ``stop`` leaves
no process behind, and deleting the dir is a full reset.

With ``--nodes N`` (state dir ``/tmp/sdcluster-slurm-Nn``) each node's slurmd runs in its own network
namespace under its own hostname, joined by a private bridge (``netns.py``), so a multi-node job
rendezvouses across "machines" as on a real cluster; ``stop`` removes the namespaces, the bridge and the
``/etc/hosts`` lines naming the nodes. One multi-node sandbox per machine (the namespace names are fixed).

Accounting (slurmdbd + MariaDB) is not optional here: without it ``sacct`` fails and submitit silently
falls back to guessing job states, which is exactly the behaviour the tests must not depend on.
"""

from tests.sandbox.lifecycle import is_running, resolve_dir, start, stop
from tests.sandbox.spec import APT_PACKAGES, DEFAULT_DIR, PARTITIONS, SandboxError, SandboxInfo

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
