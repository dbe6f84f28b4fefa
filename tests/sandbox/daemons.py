"""The sandbox's daemons one by one: find, spawn and wait for munged, MariaDB, slurmdbd (see lifecycle.py)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.sandbox.configs import (
    CLUSTER,
    DB_NAME,
    DB_USER,
    grant_sql,
    mysql_user,
)
from tests.sandbox.spec import (
    BY_NAME,
    SEARCH_PATH,
    Daemon,
    SandboxError,
)

log = logging.getLogger(__name__)


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


def _start_slurmdbd(d: Path, cluster: str = CLUSTER) -> None:
    daemon = BY_NAME["slurmdbd"]
    _spawn(d, daemon, "slurmdbd")
    # slurmctld exits with "no TRES from it" if it starts before slurmdbd can answer.
    _wait(d, daemon, lambda: _ok(d, "sacctmgr", "-n", "show", "cluster"), "answering sacctmgr")
    clusters = _run(d, "sacctmgr", "-n", "-P", "show", "cluster", "format=cluster").stdout.split()
    if cluster not in clusters:
        log.info("registering cluster %s in slurmdbd", cluster)
        _run(d, "sacctmgr", "-i", "add", "cluster", cluster)
