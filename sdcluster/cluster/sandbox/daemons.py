"""Start, check and stop the sandbox's daemons: munged, MariaDB, slurmdbd, slurmctld, slurmd."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from sdcluster.cluster.sandbox.configs import (
    CLUSTER,
    DB_NAME,
    DB_USER,
    grant_sql,
    mysql_user,
    node_name,
    write_configs,
)
from sdcluster.cluster.sandbox.spec import (
    APT_PACKAGES,
    BINARIES,
    BY_NAME,
    DAEMONS,
    DEFAULT_DIR,
    HEALTHY_NODE_STATES,
    SEARCH_PATH,
    Daemon,
    SandboxError,
    SandboxInfo,
)

log = logging.getLogger(__name__)


def resolve_dir(state_dir: Path | str | None = None) -> Path:
    """The state dir: the argument, else ``$SDCLUSTER_SLURM_DIR``, else /tmp/sdcluster-slurm."""
    return Path(state_dir or os.environ.get("SDCLUSTER_SLURM_DIR") or DEFAULT_DIR).resolve()


def _info(d: Path) -> SandboxInfo:
    return SandboxInfo(state_dir=d, slurm_conf=d / "slurm.conf", node=node_name())


def _alive(pid: int, daemon: Daemon) -> bool:
    """True if pid is a live process that really is this daemon (pids get recycled across sessions)."""
    try:
        return daemon.exe.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _pid(d: Path, daemon: Daemon) -> int | None:
    """The daemon's pid if its pid file names a live process that is that daemon."""
    try:
        pid = int((d / daemon.pid_file).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _alive(pid, daemon) else None


def _env(d: Path) -> dict[str, str]:
    # The daemons live in /usr/sbin, which a non-login shell or CI runner may leave off PATH.
    return {**os.environ, "SLURM_CONF": str(d / "slurm.conf"), "PATH": SEARCH_PATH}


def _run(
    d: Path, *argv: str, check: bool = True, timeout: float = 30, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=_env(d), input=stdin, capture_output=True, text=True, timeout=timeout, check=check
    )


def _ok(d: Path, *argv: str, timeout: float = 10) -> bool:
    try:
        return _run(d, *argv, check=False, timeout=timeout).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _fail(d: Path, daemon: Daemon, what: str) -> SandboxError:
    path = d / daemon.log_file
    try:
        tail = "".join(path.read_text(errors="replace").splitlines(keepends=True)[-25:])
    except OSError:
        tail = "(log file missing)\n"
    return SandboxError(f"{daemon.name} failed: {what}. Log: {path}\n--- last lines of {path} ---\n{tail}")


def _wait(d: Path, daemon: Daemon, ready: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Poll until ready() or the deadline; fail early if the daemon died (no point waiting on a corpse)."""
    deadline = time.monotonic() + timeout
    grace = time.monotonic() + 5  # a daemonising process writes its pid file a moment after fork
    while not ready():
        if time.monotonic() > deadline:
            raise _fail(d, daemon, f"not {what} after {timeout:.0f} s")
        if time.monotonic() > grace and _pid(d, daemon) is None:
            raise _fail(d, daemon, f"exited before {what}")
        time.sleep(0.2)


def _node_state(d: Path) -> str:
    try:
        out = _run(d, "sinfo", "-h", "-N", "-n", node_name(), "-o", "%t", check=False, timeout=5)
    except subprocess.TimeoutExpired:
        return ""
    return out.stdout.strip().split("\n")[0] if out.returncode == 0 else ""


def is_running(state_dir: Path | str | None = None) -> bool:
    """True when every daemon of the sandbox is alive and the node accepts jobs."""
    d = resolve_dir(state_dir)
    if not (d / "slurm.conf").exists() or any(_pid(d, x) is None for x in DAEMONS):
        return False
    return _node_state(d) in HEALTHY_NODE_STATES


def _spawn(d: Path, daemon: Daemon, *argv: str, foreground: bool = False) -> None:
    """Run a command that daemonises itself and check its exit status.

    A foreground server (mariadbd) goes through `setsid -f`, which forks it off and returns at once: it must
    not stay a child of this process, or pytest would warn about a still-running subprocess and a crash
    would leave a zombie under the test session instead of being reaped by init.
    """
    argv = ("setsid", "-f", *argv) if foreground else argv
    log.info("starting %s: %s (log: %s)", daemon.name, " ".join(argv), d / daemon.log_file)
    with open(d / daemon.log_file, "ab") as out:
        proc = subprocess.run(
            argv,
            env=_env(d),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            timeout=120,
            check=False,
        )
    if proc.returncode != 0:
        raise _fail(d, daemon, f"{argv[0]} exited with status {proc.returncode}")


def _start_munge(d: Path) -> None:
    """A private munged on a socket under the state dir (slurm.conf's AuthInfo points at it)."""
    daemon = BY_NAME["munged"]
    key = d / "munge" / "munge.key"
    if not key.exists():
        log.info("creating munge key %s", key)
        subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, capture_output=True)
    key.chmod(0o600)
    sock = d / "munge" / "munge.socket"
    sock.unlink(missing_ok=True)
    _spawn(
        d,
        daemon,
        "munged",
        "--force",
        f"--socket={sock}",
        f"--key-file={key}",
        f"--pid-file={d / daemon.pid_file}",
        f"--log-file={d / daemon.log_file}",
        f"--seed-file={d / 'munge' / 'munged.seed'}",
    )
    _wait(d, daemon, lambda: _ok(d, "munge", "-n", f"--socket={sock}"), "answering on its socket")


def _start_mariadb(d: Path, db_password: str) -> None:
    daemon = BY_NAME["mariadb"]
    cnf, user = d / "mysql" / "my.cnf", mysql_user(d)
    datadir = d / "mysql" / "data"
    shutil.chown(d / "mysql", user, user)
    (d / daemon.log_file).touch()
    shutil.chown(d / daemon.log_file, user, user)  # shared by mariadbd's stderr and its log-error
    if not (datadir / "mysql").is_dir():
        log.info("initialising MariaDB data dir %s (as user %s)", datadir, user)
        shutil.rmtree(datadir, ignore_errors=True)  # a half-initialised dir from an interrupted run
        _spawn(
            d,
            daemon,
            "mariadb-install-db",
            f"--defaults-file={cnf}",
            f"--user={user}",
            "--skip-test-db",
            "--auth-root-authentication-method=socket",
        )
    (d / "mysql" / "mysqld.sock").unlink(missing_ok=True)
    # mariadbd itself rather than mysqld_safe: that wrapper ignores SIGTERM and restarts a server we had
    # to SIGKILL, and it chowns the socket's folder; one process with one pid file is simpler to manage.
    _spawn(d, daemon, "mariadbd", f"--defaults-file={cnf}", f"--user={user}", foreground=True)
    sql = ["mariadb", f"--defaults-file={cnf}", "-uroot", "-e"]
    _wait(d, daemon, lambda: _ok(d, *sql, "SELECT 1"), "accepting connections")
    log.info("creating database %s and user %s", DB_NAME, DB_USER)
    _run(d, *sql[:-1], stdin=grant_sql(db_password))  # on stdin: keep the password out of `ps`


def _start_slurmdbd(d: Path) -> None:
    daemon = BY_NAME["slurmdbd"]
    _spawn(d, daemon, "slurmdbd")
    # slurmctld exits with "no TRES from it" if it starts before slurmdbd can answer.
    _wait(d, daemon, lambda: _ok(d, "sacctmgr", "-n", "show", "cluster"), "answering sacctmgr")
    clusters = _run(d, "sacctmgr", "-n", "-P", "show", "cluster", "format=cluster").stdout.split()
    if CLUSTER not in clusters:
        log.info("registering cluster %s in slurmdbd", CLUSTER)
        _run(d, "sacctmgr", "-i", "add", "cluster", CLUSTER)


def _start_slurm(d: Path) -> None:
    ctld, slurmd = BY_NAME["slurmctld"], BY_NAME["slurmd"]
    _spawn(d, ctld, "slurmctld")
    _wait(d, ctld, lambda: _ok(d, "scontrol", "ping"), "answering scontrol ping")
    _spawn(d, slurmd, "slurmd", "-N", node_name())
    resumed = False

    def node_ready() -> bool:
        nonlocal resumed
        state = _node_state(d)
        if not resumed and state.startswith(("down", "drain", "drng", "fail")):
            # A node drained or downed in a previous session stays so in the saved state; clear it once.
            log.info("node %s is %s from an earlier run: resuming it", node_name(), state)
            _run(d, "scontrol", "update", f"NodeName={node_name()}", "State=RESUME", check=False)
            resumed = True
        return state in HEALTHY_NODE_STATES

    _wait(d, slurmd, node_ready, "idle in sinfo", timeout=90)


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    """Serialise start/stop between processes (e.g. two pytest sessions starting at once)."""
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def start(state_dir: Path | str | None = None) -> SandboxInfo:
    """Bring the sandbox up (or reuse it when healthy) and return how to reach it."""
    d = resolve_dir(state_dir)
    missing = [b for b in BINARIES if shutil.which(b, path=SEARCH_PATH) is None]
    if missing:
        raise SandboxError(
            f"SLURM sandbox needs {', '.join(missing)}: apt-get install {' '.join(APT_PACKAGES)}"
        )
    if is_running(d):  # unlocked fast path: read-only checks
        log.info("SLURM sandbox already running in %s", d)
        return _info(d)
    with _locked(d):
        if is_running(d):
            return _info(d)
        t0 = time.monotonic()
        _stop_daemons(d)  # whatever is half up from an earlier session: restart from a known state
        password = secrets.token_hex(16)
        ports = write_configs(d, password)
        log.info("wrote %s (ports %s)", d / "slurm.conf", ports)
        _start_munge(d)
        _start_mariadb(d, password)
        _start_slurmdbd(d)
        _start_slurm(d)
        log.info("SLURM sandbox up in %.1f s: export SLURM_CONF=%s", time.monotonic() - t0, d / "slurm.conf")
    return _info(d)


def _stop_daemons(d: Path, timeout: float = 20) -> None:
    for daemon in reversed(DAEMONS):
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


def stop(state_dir: Path | str | None = None) -> None:
    """Stop the daemons this sandbox started (found by their pid files); state and logs stay."""
    d = resolve_dir(state_dir)
    if d.is_dir():
        with _locked(d):
            _stop_daemons(d)
