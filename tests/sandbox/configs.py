"""The sandbox's config files: slurm.conf, slurmdbd.conf and MariaDB's my.cnf, on ports free right now."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING

from tests.sandbox.spec import SandboxError, node_name

if TYPE_CHECKING:
    from tests.sandbox.layout import Layout

CLUSTER = "sdcluster"
DB_NAME, DB_USER = "slurm_acct_db", "slurm"
_FIRST_PORT = 16817  # SLURM's defaults are 6817-6819: never collide with a real cluster's daemons
_N_PORTS = 4  # slurmctld, slurmd, slurmdbd, mariadb
GRACE_TIME_S = 20  # `low`, `lowcancel`: from preemption's SIGTERM to SIGKILL (a tiny job saves in ~1 s)


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


def mysql_user(d: Path) -> str:
    """Run MariaDB as `mysql` when that user can reach the state dir, else as root (--dir under /root)."""
    reachable = all(p.stat().st_mode & 0o001 for p in [d, *d.parents])
    return "mysql" if reachable else "root"


def _node_lines(d: Path, lay: Layout) -> str:
    """Per-node files and NodeName lines; several slurmd on one machine keep apart by ``%n``."""
    tag = "-%n" if lay.namespaced else ""
    spool = f"{d}/spool/%n" if lay.namespaced else f"{d}/spool"
    lines = [
        f"SlurmdSpoolDir={spool}",
        f"SlurmdPidFile={d}/run/slurmd{tag}.pid",
        f"SlurmdLogFile={d}/log/slurmd{tag}.log",
    ]
    for n in lay.nodes:
        hostname = f" NodeHostname={n.name}" if n.netns else ""
        size = f"CPUs={n.cpus} RealMemory={n.memory_mb}"
        lines.append(f"NodeName={n.name} NodeAddr={n.addr}{hostname} {size} State=UNKNOWN")
    names = ",".join(n.name for n in lay.nodes)
    # debug and short are never preempted (PreemptMode=OFF), so the cluster-wide REQUEUE below changes
    # nothing for them; a job on `high` preempts only jobs on `low`, as a site's scavenger partition.
    lines.append(f"PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP PreemptMode=OFF")
    lines.append(f"PartitionName=short Nodes={names} MaxTime=60 State=UP PreemptMode=OFF")
    # SIGCONT + SIGTERM on preemption, then GraceTime seconds before SIGKILL; SLURM requeues the job.
    lines.append(
        f"PartitionName=low Nodes={names} MaxTime=INFINITE State=UP PriorityTier=1 "
        f"GraceTime={GRACE_TIME_S} PreemptMode=REQUEUE"
    )
    # The same, but SLURM cancels the preempted job instead of requeueing it (sites that do not requeue).
    lines.append(
        f"PartitionName=lowcancel Nodes={names} MaxTime=INFINITE State=UP PriorityTier=1 "
        f"GraceTime={GRACE_TIME_S} PreemptMode=CANCEL"
    )
    lines.append(
        f"PartitionName=high Nodes={names} MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF"
    )
    return "\n".join(lines) + "\n"


def _render_slurm_conf(
    d: Path, lay: Layout, ctld: int, slurmd: int, dbd: int, cluster: str = CLUSTER, first_job_id: int = 1
) -> str:
    # linuxproc + task/none: a container without systemd gives slurmd no cgroup tree to manage.
    # SlurmctldHost/NodeAddr on 127.0.0.1 keep all traffic on loopback whatever the hostname resolves to;
    # with namespaced nodes the controller is the bridge's address, the one address every node can reach
    # (slurmctld only starts under the machine's own hostname, whatever address it is given).
    # JobRequeue=1 lets submitit's Checkpointable requeue itself; short MinJobAge/KillWait keep tests fast.
    # Preemption by partition priority (`high` over `low`), as sites run it: PreemptMode=REQUEUE sends the
    # preempted job SIGTERM and requeues it itself (partition_prio refuses a cluster-wide PreemptMode=OFF).
    # cred_expire=10 (default 120): a requeued job may only start again after it, so a preempted test job
    # would idle two minutes; 10 s is still ample for a step launch on one machine.
    # config_overrides: the one-node sandbox declares more CPUs than the machine has (layout.py says why);
    # without it slurmctld drains a node that registers fewer CPUs than slurm.conf gives it.
    return f"""\
ClusterName={cluster}
FirstJobId={first_job_id}
SlurmctldHost={node_name()}({lay.controller_addr})
SlurmctldPort={ctld}
SlurmdPort={slurmd}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.socket,cred_expire=10
StateSaveLocation={d}/state
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmctldLogFile={d}/log/slurmctld.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
ReturnToService=2
SlurmdParameters=config_overrides
MpiDefault=none
JobRequeue=1
MinJobAge=30
KillWait=5
InactiveLimit=0
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost={lay.controller_addr}
AccountingStoragePort={dbd}
AccountingStoragePass={d}/munge/munge.socket
{_node_lines(d, lay)}"""


def _render_slurmdbd_conf(d: Path, lay: Layout, dbd: int, mysql: int, password: str) -> str:
    return f"""\
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.socket
DbdHost={node_name()}
DbdAddr={lay.controller_addr}
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


def grant_sql(password: str) -> str:
    user = f"'{DB_USER}'@'127.0.0.1'"
    return (
        f"CREATE DATABASE IF NOT EXISTS {DB_NAME}; CREATE USER IF NOT EXISTS {user}; "
        f"ALTER USER {user} IDENTIFIED BY '{password}'; GRANT ALL ON {DB_NAME}.* TO {user};"
    )


def write_configs(
    d: Path, lay: Layout, password: str, cluster: str = CLUSTER, first_job_id: int = 1
) -> list[int]:
    """(Re)write every config with ports free right now and a fresh database password.

    ``cluster``, ``first_job_id``: a second sandbox beside the first (in its own state dir) gets its own
    ClusterName, and may start its job ids where the first one's are, so that an id names a job on each.
    """
    for sub in ("run", "log", "state", "spool", "munge", "mysql"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    for node in lay.nodes if lay.namespaced else ():
        (d / "spool" / node.name).mkdir(exist_ok=True)
    ctld, slurmd, dbd, mysql = ports = _free_ports()
    (d / "slurm.conf").write_text(_render_slurm_conf(d, lay, ctld, slurmd, dbd, cluster, first_job_id))
    dbd_conf = d / "slurmdbd.conf"
    dbd_conf.touch(mode=0o600)
    dbd_conf.chmod(0o600)  # slurmdbd refuses a config others can read: it holds the database password
    dbd_conf.write_text(_render_slurmdbd_conf(d, lay, dbd, mysql, password))
    (d / "mysql" / "my.cnf").write_text(_render_my_cnf(d, mysql))
    return ports
