"""The private network of a multi-node sandbox: a bridge, one network namespace + veth pair per node.

Each node's slurmd runs inside its namespace (``nsenter --net``) and a fresh UTS namespace holding the node's
hostname, so the jobs it starts see what they would on a real node: their own hostname and address, and the
first node's name as the rendezvous host. ``ip netns exec`` is not used on purpose: it remounts /sys, and
slurmd then stops with "No filesystem mounted on /sys/fs/cgroup".

Everything here exists only inside this machine and only while the sandbox runs: :func:`up` first removes
whatever an earlier, crashed session left (it is idempotent), :func:`down` removes the namespaces (their
veth ends go with them), the bridge and our ``/etc/hosts`` lines.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from tests.sandbox.layout import Layout, Node
from tests.sandbox.spec import SandboxError

log = logging.getLogger(__name__)

BRIDGE = "sdcbr0"
_VETH_PREFIX = "sdcv"
NETNS_PREFIX = "sdcluster-n"
HOSTS = Path("/etc/hosts")
_HOSTS_TAG = "# sdcluster-sandbox"  # marks the lines we add, so only those are ever removed


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise SandboxError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


def _ours() -> list[str]:
    """Our namespaces that exist now (also those of a crashed session with a different node count)."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    return [line.split()[0] for line in listed if line.startswith(NETNS_PREFIX)]


def _veth(node: Node) -> str:
    return f"{_VETH_PREFIX}{node.name}"  # the machine-side end; the node-side end is "eth0" in the namespace


def _links(prefix: str) -> list[str]:
    """Links here whose name starts with ``prefix`` (``ip -o link``: `3: name@peer: ...`)."""
    lines = _ip("-o", "link", "show", check=False).stdout.splitlines()
    names = [line.split(":")[1].strip().split("@")[0] for line in lines if line.count(":") >= 2]
    return [name for name in names if name.startswith(prefix)]


def _write_hosts(lines: list[str]) -> None:
    # Written in place, not renamed over: /etc/hosts is often a bind mount (containers), which a rename
    # would fail on. The lines are few and short; a reader mid-write at worst misses ours for a moment.
    HOSTS.write_text("".join(lines))


def _hosts_without_ours() -> list[str]:
    return [ln for ln in HOSTS.read_text().splitlines(keepends=True) if _HOSTS_TAG not in ln]


def down() -> None:
    """Remove every namespace, veth and bridge of ours and our /etc/hosts lines; missing ones are fine."""
    for ns in _ours():
        log.info("removing network namespace %s", ns)
        _ip("netns", "del", ns, check=False)  # deletes the node-side veth end, and with it the pair
    for link in _links(_VETH_PREFIX):  # normally gone with their namespace; not if a run died mid-setup
        _ip("link", "del", link, check=False)
    if _links(BRIDGE):
        log.info("removing bridge %s", BRIDGE)
        _ip("link", "del", BRIDGE, check=False)
    if HOSTS.is_file():
        kept = _hosts_without_ours()
        if len(kept) != len(HOSTS.read_text().splitlines()):
            _write_hosts(kept)


def up(lay: Layout) -> None:
    """Build the bridge, each node's namespace and veth, and /etc/hosts lines naming the nodes."""
    down()
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{lay.controller_addr}/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")
    for node in lay.nodes:
        assert node.netns, "only namespaced nodes get a network here"
        outer = _veth(node)
        _ip("netns", "add", node.netns)
        _ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
        _ip("link", "set", outer, "master", BRIDGE)
        _ip("link", "set", outer, "up")
        _ip("-n", node.netns, "addr", "add", f"{node.addr}/24", "dev", "eth0")
        _ip("-n", node.netns, "link", "set", "eth0", "up")
        _ip("-n", node.netns, "link", "set", "lo", "up")  # gloo and slurmstepd also talk on loopback
    # Ranks rendezvous on the first node's *name* (SLURM_JOB_NODELIST), and gloo binds to the address its
    # own hostname resolves to: every node name must resolve, on the machine and inside every namespace.
    ours = [f"{node.addr} {node.name} {_HOSTS_TAG}\n" for node in lay.nodes]
    kept = _hosts_without_ours()
    if kept and not kept[-1].endswith("\n"):
        kept[-1] += "\n"
    _write_hosts(kept + ours)
    log.info("network up: bridge %s %s, nodes %s", BRIDGE, lay.controller_addr, [n.name for n in lay.nodes])


def exists() -> bool:
    """Whether any namespace, veth or bridge of ours is there."""
    return bool(_ours() or _links(_VETH_PREFIX) or _links(BRIDGE))


def inside(node: Node, argv: list[str]) -> list[str]:
    """``argv`` run in the node's network namespace under the node's own hostname."""
    if node.netns is None:
        return argv
    enter = ["nsenter", f"--net=/var/run/netns/{node.netns}", "unshare", "--uts"]
    set_name = 'hostname "$0" && exec "$@"'  # $0 is the node name, "$@" the command
    return [*enter, "sh", "-c", set_name, node.name, *argv]
