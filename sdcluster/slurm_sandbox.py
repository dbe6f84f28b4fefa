"""A real single-node SLURM cluster on this machine, for the test suite and for trying sdcluster.

Run as root (slurmd must be able to start jobs as any user)::

    python -m sdcluster.slurm_sandbox start            # idempotent: reuses a healthy sandbox in < 2 s
    eval "$(python -m sdcluster.slurm_sandbox env)"    # export SLURM_CONF=... for sbatch/sinfo/submitit
    python -m sdcluster.slurm_sandbox status           # sinfo
    python -m sdcluster.slurm_sandbox stop

Needs the Debian/Ubuntu packages listed in ``APT_PACKAGES`` (tested with SLURM 22.05, MariaDB 10.11).

Everything lives under one state dir (``/tmp/sdcluster-slurm``, or ``--dir`` / ``$SDCLUSTER_SLURM_DIR``):
config, a private munged, a private MariaDB, slurmdbd, slurmctld, slurmd, their pid files, logs and
state. Nothing under /etc is touched and no system daemon is reused, so the sandbox can sit next to a real
SLURM or MariaDB install, ``stop`` leaves no process behind, and deleting the dir is a full reset.

Accounting (slurmdbd + MariaDB) is not optional here: without it ``sacct`` fails and submitit silently
falls back to guessing job states, which is exactly the behaviour the tests must not depend on.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_DIR = Path("/tmp/sdcluster-slurm")
APT_PACKAGES = ("slurm-wlm", "slurmdbd", "munge", "mariadb-server")
PARTITIONS = ["debug", "short"]
_BINARIES = ("setsid", "munged", "munge", "mungekey", "mariadb-install-db", "mariadbd", "mariadb", "slurmdbd")
_BINARIES += ("slurmctld", "slurmd", "sinfo", "sacctmgr", "scontrol")
_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
_HEALTHY_NODE_STATES = {"idle", "mix", "mixed", "alloc", "allocated", "comp", "completing"}


class SandboxError(RuntimeError):
    """A daemon of the sandbox could not be started; the message names it and its log file."""


@dataclass(frozen=True)
class SandboxInfo:
    """How to reach a running sandbox: point ``SLURM_CONF`` at ``slurm_conf``; ``debug`` is the default."""

    state_dir: Path
    slurm_conf: Path
    node: str
    partitions: list[str] = field(default_factory=lambda: list(PARTITIONS))

    @property
    def env(self) -> dict[str, str]:
        """What a client process needs in its environment to talk to this cluster."""
        return {"SLURM_CONF": str(self.slurm_conf)}


@dataclass(frozen=True)
class _Daemon:
    name: str
    exe: str  # substring of /proc/<pid>/cmdline, so a recycled pid is not mistaken for our daemon
    pid_file: str  # relative to the state dir
    log_file: str


# Start order; stop goes in reverse. MariaDB's log sits in its own
# folder because mariadbd may run as user mysql, which cannot write to root's log/ folder.
_DAEMONS = (
    _Daemon("munged", "munged", "run/munged.pid", "log/munged.log"),
    _Daemon("mariadb", "mariadbd", "mysql/mysqld.pid", "mysql/mariadb.log"),
    _Daemon("slurmdbd", "slurmdbd", "run/slurmdbd.pid", "log/slurmdbd.log"),
    _Daemon("slurmctld", "slurmctld", "run/slurmctld.pid", "log/slurmctld.log"),
    _Daemon("slurmd", "slurmd", "run/slurmd.pid", "log/slurmd.log"),
)
_BY_NAME = {d.name: d for d in _DAEMONS}

CLUSTER = "sdcluster"
DB_NAME, DB_USER = "slurm_acct_db", "slurm"
_FIRST_PORT = 16817  # SLURM's defaults are 6817-6819: never collide with a real cluster's daemons
_N_PORTS = 4  # slurmctld, slurmd, slurmdbd, mariadb


def node_name() -> str:
    """`hostname -s`: slurmd finds its NodeName line by this name."""
    return socket.gethostname().split(".")[0]


def _real_memory_mb() -> int:
    """10% under what slurmd will measure: a node configured above its real memory is drained."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT from our last run
        try:
            s.bind(("", port))  # slurmctld and slurmd bind every address, so test every address
        except OSError:
            return False
    return True


def _free_ports() -> list[int]:
    for base in range(_FIRST_PORT, _FIRST_PORT + 1000, 10):
        ports = list(range(base, base + _N_PORTS))
        if all(_port_free(p) for p in ports):
            return ports
    raise SandboxError(f"no {_N_PORTS} free consecutive TCP ports from {_FIRST_PORT}")


def _mysql_user(d: Path) -> str:
    """Run MariaDB as `mysql` when that user can reach the state dir, else as root (--dir under /root)."""
    reachable = all(p.stat().st_mode & 0o001 for p in [d, *d.parents])
    return "mysql" if reachable else "root"


def _render_slurm_conf(d: Path, ctld: int, slurmd: int, dbd: int) -> str:
    node, cpus = node_name(), len(os.sched_getaffinity(0))  # `nproc`: the CPUs this process may use
    # linuxproc + task/none: a container without systemd gives slurmd no cgroup tree to manage.
    # SlurmctldHost/NodeAddr on 127.0.0.1 keep all traffic on loopback whatever the hostname resolves to.
    # JobRequeue=1 lets submitit's Checkpointable requeue itself; short MinJobAge/KillWait keep tests fast.
    # cred_expire=10 (default 120): a requeued job may only start again after it, so a preempted test job
    # would idle two minutes; 10 s is still ample for a step launch on one machine.
    return f"""\
ClusterName={CLUSTER}
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={slurmd}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket,cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
ReturnToService=2
MpiDefault=none
JobRequeue=1
MinJobAge=30
KillWait=5
InactiveLimit=0
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={dbd}
AccountingStoragePass={d}/munge/munge.socket
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_real_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes={node} MaxTime=60 State=UP
"""


def _render_slurmdbd_conf(d: Path, dbd: int, mysql: int, password: str) -> str:
    return f"""\
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.socket
DbdHost={node_name()}
DbdAddr=127.0.0.1
DbdPort={dbd}
SlurmUser=root
PidFile={d}/run/slurmdbd.pid
LogFile={d}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={mysql}
StorageUser={DB_USER}
StoragePass={password}
StorageLoc={DB_NAME}
"""


def _render_my_cnf(d: Path, mysql: int) -> str:
    m = d / "mysql"
    # native AIO off: gVisor-style sandboxes lack io_submit; small InnoDB files keep a cold start quick.
    return f"""\
[mysqld]
datadir={m}/data
socket={m}/mysqld.sock
pid-file={m}/mysqld.pid
log-error={m}/mariadb.log
port={mysql}
bind-address=127.0.0.1
skip-name-resolve
innodb_use_native_aio=0
innodb_buffer_pool_size=32M
innodb_log_file_size=16M
innodb_lock_wait_timeout=900
[client]
socket={m}/mysqld.sock
"""


def _grant_sql(password: str) -> str:
    user = f"'{DB_USER}'@'127.0.0.1'"
    return (
        f"CREATE DATABASE IF NOT EXISTS {DB_NAME}; CREATE USER IF NOT EXISTS {user}; "
        f"ALTER USER {user} IDENTIFIED BY '{password}'; GRANT ALL ON {DB_NAME}.* TO {user};"
    )


def _write_configs(d: Path, password: str) -> list[int]:
    """(Re)write every config with ports free right now and a fresh database password."""
    for sub in ("run", "log", "state", "spool", "munge", "mysql"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    ctld, slurmd, dbd, mysql = ports = _free_ports()
    (d / "slurm.conf").write_text(_render_slurm_conf(d, ctld, slurmd, dbd))
    dbd_conf = d / "slurmdbd.conf"
    dbd_conf.touch(mode=0o600)
    dbd_conf.chmod(0o600)  # slurmdbd refuses a config others can read: it holds the database password
    dbd_conf.write_text(_render_slurmdbd_conf(d, dbd, mysql, password))
    (d / "mysql" / "my.cnf").write_text(_render_my_cnf(d, mysql))
    return ports


def resolve_dir(state_dir: Path | str | None = None) -> Path:
    """The state dir: the argument, else ``$SDCLUSTER_SLURM_DIR``, else /tmp/sdcluster-slurm."""
    return Path(state_dir or os.environ.get("SDCLUSTER_SLURM_DIR") or DEFAULT_DIR).resolve()


def _info(d: Path) -> SandboxInfo:
    return SandboxInfo(state_dir=d, slurm_conf=d / "slurm.conf", node=node_name())


def _alive(pid: int, daemon: _Daemon) -> bool:
    """True if pid is a live process that really is this daemon (pids get recycled across sessions)."""
    try:
        return daemon.exe.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _pid(d: Path, daemon: _Daemon) -> int | None:
    """The daemon's pid if its pid file names a live process that is that daemon."""
    try:
        pid = int((d / daemon.pid_file).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _alive(pid, daemon) else None


def _env(d: Path) -> dict[str, str]:
    # The daemons live in /usr/sbin, which a non-login shell or CI runner may leave off PATH.
    return {**os.environ, "SLURM_CONF": str(d / "slurm.conf"), "PATH": _PATH}


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


def _fail(d: Path, daemon: _Daemon, what: str) -> SandboxError:
    path = d / daemon.log_file
    try:
        tail = "".join(path.read_text(errors="replace").splitlines(keepends=True)[-25:])
    except OSError:
        tail = "(log file missing)\n"
    return SandboxError(f"{daemon.name} failed: {what}. Log: {path}\n--- last lines of {path} ---\n{tail}")


def _wait(d: Path, daemon: _Daemon, ready: Callable[[], bool], what: str, timeout: float = 60) -> None:
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
    if not (d / "slurm.conf").exists() or any(_pid(d, x) is None for x in _DAEMONS):
        return False
    return _node_state(d) in _HEALTHY_NODE_STATES


def _spawn(d: Path, daemon: _Daemon, *argv: str, foreground: bool = False) -> None:
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
    daemon = _BY_NAME["munged"]
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
    daemon = _BY_NAME["mariadb"]
    cnf, user = d / "mysql" / "my.cnf", _mysql_user(d)
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
    _run(d, *sql[:-1], stdin=_grant_sql(db_password))  # on stdin: keep the password out of `ps`


def _start_slurmdbd(d: Path) -> None:
    daemon = _BY_NAME["slurmdbd"]
    _spawn(d, daemon, "slurmdbd")
    # slurmctld exits with "no TRES from it" if it starts before slurmdbd can answer.
    _wait(d, daemon, lambda: _ok(d, "sacctmgr", "-n", "show", "cluster"), "answering sacctmgr")
    clusters = _run(d, "sacctmgr", "-n", "-P", "show", "cluster", "format=cluster").stdout.split()
    if CLUSTER not in clusters:
        log.info("registering cluster %s in slurmdbd", CLUSTER)
        _run(d, "sacctmgr", "-i", "add", "cluster", CLUSTER)


def _start_slurm(d: Path) -> None:
    ctld, slurmd = _BY_NAME["slurmctld"], _BY_NAME["slurmd"]
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
        return state in _HEALTHY_NODE_STATES

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
    missing = [b for b in _BINARIES if shutil.which(b, path=_PATH) is None]
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
        ports = _write_configs(d, password)
        log.info("wrote %s (ports %s)", d / "slurm.conf", ports)
        _start_munge(d)
        _start_mariadb(d, password)
        _start_slurmdbd(d)
        _start_slurm(d)
        log.info("SLURM sandbox up in %.1f s: export SLURM_CONF=%s", time.monotonic() - t0, d / "slurm.conf")
    return _info(d)


def _stop_daemons(d: Path, timeout: float = 20) -> None:
    for daemon in reversed(_DAEMONS):
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


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=Path, default=None, help=f"state dir (default: {DEFAULT_DIR})")
    parser = argparse.ArgumentParser(
        prog="python -m sdcluster.slurm_sandbox",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    commands = {
        "start": "start or reuse the sandbox",
        "stop": "stop its daemons",
        "status": "print sinfo",
        "env": "print the line that exports SLURM_CONF",
    }
    for name, help_ in commands.items():
        sub.add_parser(name, parents=[common], help=help_)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    d = resolve_dir(args.dir)
    if args.cmd == "start":
        try:
            start(d)
        except SandboxError as err:
            print(err, file=sys.stderr)
            return 1
    elif args.cmd == "stop":
        stop(d)
    elif args.cmd == "env":
        print(f"export SLURM_CONF={shlex.quote(str(d / 'slurm.conf'))}")
    elif not is_running(d):
        print(f"SLURM sandbox in {d} is not running", file=sys.stderr)
        return 1
    else:
        print(_run(d, "sinfo").stdout, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
