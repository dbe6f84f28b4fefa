"""Which nodes a sandbox has: one node on loopback, or N nodes, each in its own network namespace.

A one-node sandbox runs slurmd under the machine's own hostname on 127.0.0.1. An N-node sandbox gives each
node what a real cluster node has and a single slurmd cannot fake: its own hostname (``n1``, ``n2``, ...,
what ranks rendezvous on) and its own address on a private bridge (``netns.py`` builds both). The machine's
CPUs and memory are split between the nodes, so SLURM never places more work on them than one machine has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tests.sandbox.spec import BASE_DAEMONS, Daemon, SandboxError, node_name

SUBNET = "10.231.0"  # RFC 1918 space that exists only on our bridge, inside this machine
CONTROLLER_ADDR = f"{SUBNET}.1"  # the bridge's address in the machine's own namespace: slurmctld, slurmdbd
_LAYOUT_FILE = "nodes"  # the node count a state dir was started with, so `stop` knows what to tear down


@dataclass(frozen=True)
class Node:
    """One slurmd: its NodeName (and hostname), address, network namespace (None: the machine's own)."""

    name: str
    addr: str
    netns: str | None
    cpus: int
    memory_mb: int


@dataclass(frozen=True)
class Layout:
    """The nodes of one sandbox and the address its controller is reached on."""

    nodes: tuple[Node, ...]
    controller_addr: str

    @property
    def namespaced(self) -> bool:
        return any(node.netns for node in self.nodes)

    @property
    def daemons(self) -> tuple[Daemon, ...]:
        """Start order: the shared daemons, then one slurmd per node (pid and log file per node)."""
        if not self.namespaced:
            return (*BASE_DAEMONS, Daemon("slurmd", "slurmd", "run/slurmd.pid", "log/slurmd.log"))
        per_node = (
            Daemon(f"slurmd {n.name}", "slurmd", f"run/slurmd-{n.name}.pid", f"log/slurmd-{n.name}.log")
            for n in self.nodes
        )
        return (*BASE_DAEMONS, *per_node)

    def daemon(self, node: Node) -> Daemon:
        return self.daemons[len(BASE_DAEMONS) + self.nodes.index(node)]


# The one-node sandbox declares at least this many CPUs, more than a small machine has. Its test jobs mostly
# wait (for a signal, a time limit, a grace time), so the suite runs several at once on parallel workers;
# with the machine's 2 CPUs declared, SLURM would queue every other worker's 2-task job behind the running one
# and the workers would wait on the queue instead of overlapping. The CPUs are shared as any overloaded
# machine's are (no binding: TaskPlugin=task/none); slurm.conf's config_overrides keeps the node in service.
SINGLE_NODE_MIN_CPUS = 8


def _cpus() -> int:
    return len(os.sched_getaffinity(0))  # `nproc`: the CPUs this process may use


def _memory_mb() -> int:
    """10% under what slurmd will measure: a node configured above its real memory is drained."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)


def layout(count: int = 1) -> Layout:
    """One node under this machine's hostname (at least ``SINGLE_NODE_MIN_CPUS``), or ``count`` namespaced
    nodes n1..nN sharing the machine's CPUs."""
    if count < 1:
        raise SandboxError(f"a sandbox needs at least one node, not {count}")
    if count == 1:
        node = Node(node_name(), "127.0.0.1", None, max(_cpus(), SINGLE_NODE_MIN_CPUS), _memory_mb())
        return Layout((node,), "127.0.0.1")
    if _cpus() < count:
        raise SandboxError(f"{count} nodes need at least {count} CPUs; this machine has {_cpus()}")
    cpus, memory = _cpus() // count, _memory_mb() // count
    nodes = tuple(
        Node(f"n{k}", f"{SUBNET}.{k + 1}", f"sdcluster-n{k}", cpus, memory) for k in range(1, count + 1)
    )
    return Layout(nodes, CONTROLLER_ADDR)


def save(d: Path, lay: Layout) -> None:
    (d / _LAYOUT_FILE).write_text(f"{len(lay.nodes)}\n")


def saved(d: Path) -> Layout:
    """The layout the state dir was last started with (one node when it never recorded one)."""
    try:
        return layout(int((d / _LAYOUT_FILE).read_text().strip()))
    except (OSError, ValueError):
        return layout(1)
