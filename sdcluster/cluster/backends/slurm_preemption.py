"""How SLURM ends a job it preempts: the ``PreemptMode`` that applies to it (``REQUEUE``, ``CANCEL``...),
asked of SLURM's own commands (scontrol, sacctmgr) when the job got SIGTERM and saved, so that it can do
at once what SLURM would do at the end of the grace time.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=20, check=False)


# What PreemptMode may hold besides the mode itself: GANG (time-slicing) and WITHIN (preemption inside a
# QOS) qualify it, they are not what happens to the preempted job.
_MODE_QUALIFIERS = ("GANG", "WITHIN")


def _mode(text: str | None) -> str | None:
    """The mode in a PreemptMode value ("REQUEUE", "SUSPEND,GANG"), upper case; None when unset."""
    words = [w for w in (text or "").upper().split(",") if w and w not in _MODE_QUALIFIERS]
    return words[0] if words and words[0] not in ("CLUSTER", "(NULL)") else None


def _qos_mode(qos: str) -> str | None:
    """The QOS's own PreemptMode (sacctmgr says ``cluster`` when it sets none), or None."""
    try:
        out = _run(["sacctmgr", "-n", "-P", "show", "qos", qos, "format=PreemptMode"])
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    return _mode(out.stdout.strip()) if out.returncode == 0 else None


def _fields(text: str) -> dict[str, str]:
    """scontrol's one-line ``Key=Value`` fields."""
    return dict(field.partition("=")[::2] for field in text.split() if "=" in field)


def preempt_mode(partition: str, qos: str) -> str | None:
    """What SLURM does with a job of ``partition`` and ``qos`` (``scontrol show job``'s fields) when it
    preempts it: ``REQUEUE``, ``CANCEL``, ``SUSPEND``, ``OFF``; None when SLURM does not answer. Asked once
    per job and process: it does not change while the job runs."""
    return _preempt_mode(partition, qos, os.environ.get("SLURM_CONF"))


@functools.lru_cache(maxsize=8)
def _preempt_mode(partition: str, qos: str, slurm_conf: str | None) -> str | None:
    # SLURM's own order: the partition's PreemptMode when the partition sets one, else the QOS's (with
    # preempt/qos), else slurm.conf's. scontrol prints slurm.conf's for a partition that sets none, so a
    # partition whose mode equals the global one reads as unset, and the QOS may then name another.
    try:
        config = _run(["scontrol", "show", "config"])
        listing = _run(["scontrol", "-o", "show", "partition", partition])
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    if config.returncode != 0 or listing.returncode != 0:
        return None
    found = re.search(r"^PreemptMode\s*=\s*(\S+)", config.stdout, re.MULTILINE)
    cluster_mode = _mode(found.group(1) if found else None)
    part_mode = _mode(_fields(listing.stdout).get("PreemptMode"))
    if part_mode and part_mode != cluster_mode:
        return part_mode
    qos_mode = _qos_mode(qos) if qos and "preempt/qos" in config.stdout else None
    return qos_mode or part_mode or cluster_mode
