"""Bring a whole sandbox up, check it, take it down: the daemons in order, and the nodes' network if any."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.sandbox import layout as layouts
from tests.sandbox import netns
from tests.sandbox.configs import CLUSTER, _render_slurm_conf, write_configs
from tests.sandbox.daemons import (
    _alive,
    _ok,
    _pid,
    _run,
    _spawn,
    _start_mariadb,
    _start_munge,
    _start_slurmdbd,
    _wait,
)
from tests.sandbox.layout import Layout
from tests.sandbox.spec import (
    APT_PACKAGES,
    BINARIES,
    BY_NAME,
    DEFAULT_DIR,
    HEALTHY_NODE_STATES,
    NETNS_BINARIES,
    SEARCH_PATH,
    SandboxError,
    SandboxInfo,
)

log = logging.getLogger(__name__)


def resolve_dir(state_dir: Path | str | None = None, nodes: int = 1) -> Path:
    """The state dir: the argument, else ``$SDCLUSTER_SLURM_DIR``, else /tmp/sdcluster-slurm.

    A multi-node sandbox defaults to a sibling (``/tmp/sdcluster-slurm-2n``), so it can run next to the
    single-node one the test suite keeps up.
    """
    base = Path(state_dir or os.environ.get("SDCLUSTER_SLURM_DIR") or DEFAULT_DIR)
    if nodes > 1 and not state_dir:
        base = base.with_name(f"{base.name}-{nodes}n")
    return base.resolve()


def _info(d: Path, lay: Layout) -> SandboxInfo:
    names = tuple(n.name for n in lay.nodes)
    return SandboxInfo(state_dir=d, slurm_conf=d / "slurm.conf", node=names[0], nodes=names)


def _node_state(d: Path, node: str) -> str:
    try:
        out = _run(d, "sinfo", "-h", "-N", "-n", node, "-o", "%t", check=False, timeout=5)
    except subprocess.TimeoutExpired:
        return ""
    return out.stdout.strip().split("\n")[0] if out.returncode == 0 else ""


def is_running(state_dir: Path | str | None = None, nodes: int | None = None) -> bool:
    """True when every daemon of the sandbox is alive and every node accepts jobs.

    ``nodes``: also require that many nodes (a dir started with another count is not what was asked for).
    """
    d = resolve_dir(state_dir, nodes or 1)
    lay = layouts.saved(d)
    if nodes is not None and len(lay.nodes) != nodes:
        return False
    if not (d / "slurm.conf").exists() or any(_pid(d, x) is None for x in lay.daemons):
        return False
    return all(_node_state(d, n.name) in HEALTHY_NODE_STATES for n in lay.nodes)


def _conf_is_current(d: Path, lay: Layout) -> bool:
    """Whether slurm.conf is what this checkout writes (with the ports, cluster name and first job id it
    was started with): a sandbox that older code started lacks a partition or setting that tests now rely
    on, and is restarted instead of reused."""
    try:
        text = (d / "slurm.conf").read_text()
    except OSError:
        return False
    fields = dict(re.findall(r"^(\w+)=(\S*)$", text, re.MULTILINE))
    try:
        ports = (int(fields[k]) for k in ("SlurmctldPort", "SlurmdPort", "AccountingStoragePort"))
        expected = _render_slurm_conf(d, lay, *ports, fields["ClusterName"], int(fields["FirstJobId"]))
    except (KeyError, ValueError):
        return False
    return text == expected


def _start_slurm(d: Path, lay: Layout) -> None:
    ctld = BY_NAME["slurmctld"]
    _spawn(d, ctld, "slurmctld")
    _wait(d, ctld, lambda: _ok(d, "scontrol", "ping"), "answering scontrol ping")
    for node in lay.nodes:
        _spawn(d, lay.daemon(node), *netns.inside(node, ["slurmd", "-N", node.name]))
    for node in lay.nodes:
        resumed = False

        def node_ready(name: str = node.name) -> bool:
            nonlocal resumed
            state = _node_state(d, name)
            if not resumed and state.startswith(("down", "drain", "drng", "fail")):
                # A node drained or downed in a previous session stays so in the saved state; clear it once.
                log.info("node %s is %s from an earlier run: resuming it", name, state)
                _run(d, "scontrol", "update", f"NodeName={name}", "State=RESUME", check=False)
                resumed = True
            return state in HEALTHY_NODE_STATES

        _wait(d, lay.daemon(node), node_ready, "idle in sinfo", timeout=90)


_PORTS_LOCK_DIR = Path(tempfile.gettempdir()) / "sdcluster-sandbox-ports"


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    """Serialise start/stop between processes (e.g. two pytest sessions starting at once)."""
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _check_binaries(lay: Layout) -> None:
    needed = BINARIES + (NETNS_BINARIES if lay.namespaced else ())
    missing = [b for b in needed if shutil.which(b, path=SEARCH_PATH) is None]
    if missing:
        raise SandboxError(
            f"SLURM sandbox needs {', '.join(missing)}: apt-get install {' '.join(APT_PACKAGES)}"
        )


def start(
    state_dir: Path | str | None = None, nodes: int = 1, cluster: str = CLUSTER, first_job_id: int = 1
) -> SandboxInfo:
    """Bring the sandbox up (or reuse it when healthy) and return how to reach it.

    ``nodes > 1`` gives every node its own network namespace and hostname (``netns.py``; needs root).
    ``cluster`` and ``first_job_id`` (a fresh state dir only: SLURM keeps both in its state) make a second
    cluster beside the first, under its own ClusterName.
    """
    d = resolve_dir(state_dir, nodes)
    lay = layouts.layout(nodes)
    _check_binaries(lay)
    if is_running(d, nodes) and _conf_is_current(d, lay):  # unlocked fast path: read-only checks
        log.info("SLURM sandbox already running in %s", d)
        return _info(d, lay)
    with _locked(d):
        if is_running(d, nodes) and _conf_is_current(d, lay):
            return _info(d, lay)
        t0 = time.monotonic()
        _stop(d)  # whatever is half up from an earlier session: restart from a known state
        if lay.namespaced:
            netns.up(lay)
        layouts.save(d, lay)
        password = secrets.token_hex(16)
        # Ports are free when chosen and taken only when the daemons bind them: two sandboxes starting at
        # once (the one-node and two-node ones, from two test workers) would pick the same ones.
        with _locked(_PORTS_LOCK_DIR):
            ports = write_configs(d, lay, password, cluster, first_job_id)
            log.info("wrote %s (ports %s)", d / "slurm.conf", ports)
            _start_munge(d)
            _start_mariadb(d, password)
            _start_slurmdbd(d, cluster)
            _start_slurm(d, lay)
        log.info("SLURM sandbox up in %.1f s: export SLURM_CONF=%s", time.monotonic() - t0, d / "slurm.conf")
    return _info(d, lay)


def _stop(d: Path, timeout: float = 20) -> None:
    """Stop the daemons of the layout the dir was last started with, then remove its network."""
    lay = layouts.saved(d)
    for daemon in reversed(lay.daemons):
        pid = _pid(d, daemon)
        if pid is not None:
            log.info("stopping %s (pid %d)", daemon.name, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid, daemon) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _alive(pid, daemon):
                log.warning("%s ignored SIGTERM for %.0f s: killing it", daemon.name, timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        (d / daemon.pid_file).unlink(missing_ok=True)  # also clears a stale one naming a dead process
    if lay.namespaced:
        netns.down()


def stop(state_dir: Path | str | None = None, nodes: int = 1) -> None:
    """Stop the daemons this sandbox started (found by their pid files) and remove its nodes' network.

    State and logs stay, so a later start reuses the accounting database.
    """
    d = resolve_dir(state_dir, nodes)
    if d.is_dir():
        with _locked(d):
            _stop(d)
