"""What the sandbox is made of: its folder, partitions, daemons, the binaries it needs, its errors."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DIR = Path("/tmp/sdcluster-slurm")
# iproute2 (ip) and util-linux (nsenter, unshare) only for the multi-node sandbox; both are in most images.
APT_PACKAGES = ("slurm-wlm", "slurmdbd", "munge", "mariadb-server", "iproute2", "util-linux")
NETNS_BINARIES = ("ip", "nsenter", "unshare", "hostname")
PARTITIONS = ["debug", "short"]
BINARIES = ("setsid", "munged", "munge", "mungekey", "mariadb-install-db", "mariadbd", "mariadb", "slurmdbd")
BINARIES += ("slurmctld", "slurmd", "sinfo", "sacctmgr", "scontrol")
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
HEALTHY_NODE_STATES = {"idle", "mix", "mixed", "alloc", "allocated", "comp", "completing"}


def node_name() -> str:
    """`hostname -s`: slurmd finds its NodeName line by this name."""
    return socket.gethostname().split(".")[0]


class SandboxError(RuntimeError):
    """A daemon of the sandbox could not be started; the message names it and its log file."""


@dataclass(frozen=True)
class SandboxInfo:
    """How to reach a running sandbox: point ``SLURM_CONF`` at ``slurm_conf``; ``debug`` is the default."""

    state_dir: Path
    slurm_conf: Path
    node: str
    partitions: list[str] = field(default_factory=lambda: list(PARTITIONS))
    nodes: tuple[str, ...] = ()
    """Every node's name, first node first (ranks rendezvous on it); ``node`` is the first."""

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs in its environment to talk to this cluster."""
        return {"SLURM_CONF": str(self.slurm_conf)}


@dataclass(frozen=True)
class Daemon:
    name: str
    exe: str  # substring of /proc/<pid>/cmdline, so a recycled pid is not mistaken for our daemon
    pid_file: str  # relative to the state dir
    log_file: str


# Start order; stop goes in reverse. MariaDB's log sits in its own
# folder because mariadbd may run as user mysql, which cannot write to root's log/ folder.
DAEMONS = (
    Daemon("munged", "munged", "run/munged.pid", "log/munged.log"),
    Daemon("mariadb", "mariadbd", "mysql/mysqld.pid", "mysql/mariadb.log"),
    Daemon("slurmdbd", "slurmdbd", "run/slurmdbd.pid", "log/slurmdbd.log"),
    Daemon("slurmctld", "slurmctld", "run/slurmctld.pid", "log/slurmctld.log"),
    Daemon("slurmd", "slurmd", "run/slurmd.pid", "log/slurmd.log"),
)
BY_NAME = {d.name: d for d in DAEMONS}
BASE_DAEMONS = DAEMONS[:-1]  # what every sandbox shares; slurmd is per node (see layout.py)
