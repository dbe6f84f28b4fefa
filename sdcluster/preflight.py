"""Checks that run on the login node before anything is queued.

A job that waits six hours in a queue to die on a typo wastes a day; every check here names the fix.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path

from sdcluster import paths
from sdcluster.config import Config, ConfigError, check_config
from sdcluster.models import check_model_source
from sdcluster.redaction import reject_secrets
from sdcluster.tracking import check_installed


def check_data(cfg: Config) -> None:
    from sdcluster.data.metadata import validate

    folder = Path(cfg.data.path)
    if not folder.is_dir():
        raise ConfigError(
            f"data.path: {folder} is not a folder. Fix: data=imagefolder data.path=DIR (images + "
            "metadata.jsonl; make one with python -m sdcluster.data prepare DIR)"
        )
    problems = validate(folder, max_pixels=cfg.data.max_pixels, caption_column=cfg.data.caption_column)
    if not problems:
        from sdcluster.data.metadata import read_metadata
        from sdcluster.data.split import holdout_split

        try:
            holdout_split(len(read_metadata(folder)), cfg.data.holdout)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    if problems:
        listing = "\n  ".join(str(p) for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ConfigError(
            f"data.path: {folder} has {len(problems)} problem(s):\n  {listing}{more}\n"
            f"Fix them, then check with: python -m sdcluster.data validate {folder}"
        )


def check_generation_inputs(cfg: Config) -> None:
    prompts_file = cfg.generate.prompts_file
    if prompts_file and not Path(prompts_file).is_file():
        raise ConfigError(f"generate.prompts_file: {prompts_file} does not exist. Fix: give a text file path")
    if cfg.task == "generate":
        from sdcluster.sampling import require_model

        require_model(paths.generation_model(cfg))


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)


def check_slurm(cfg: Config) -> None:
    """sbatch present, controller answering, partition known: the three things users get wrong first."""
    for tool in ("sbatch", "sinfo", "squeue"):
        if shutil.which(tool) is None:
            raise ConfigError(
                f"cluster=slurm: `{tool}` is not on PATH. Fix: run from a login node of the cluster "
                "(or `module load slurm`), or use the local executor (drop +cluster=slurm)"
            )
    try:
        out = _run(["sinfo", "-h", "-o", "%P"])
    except subprocess.TimeoutExpired:
        out = subprocess.CompletedProcess([], 1, "", "no answer within 30 s")
    if out.returncode != 0:
        raise ConfigError(
            f"cluster=slurm: the SLURM controller did not answer (sinfo: {out.stderr.strip()}). "
            "Fix: check SLURM_CONF and that slurmctld is up (`scontrol ping`)"
        )
    partitions = [p.strip().rstrip("*") for p in out.stdout.split()]
    if cfg.cluster.partition and cfg.cluster.partition not in partitions:
        raise ConfigError(
            f"cluster.partition: {cfg.cluster.partition!r} is not a partition of this cluster. "
            f"Fix: use one of {', '.join(partitions)}"
        )


def preflight(cfg: Config) -> None:
    """Everything that can be checked before submission, in the order a user would fix it."""
    check_config(cfg)
    reject_secrets(dataclasses.asdict(cfg))
    check_model_source(cfg.model)
    if cfg.task in ("train", "train_generate"):
        check_installed(cfg)
        check_data(cfg)
    check_generation_inputs(cfg)
    if cfg.cluster.name == "slurm":
        check_slurm(cfg)
