"""Checks that run on the login node before anything is queued.

A job that waits six hours in a queue to die on a typo wastes a day; every check here names the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path

from sdcluster import paths
from sdcluster.cluster import backends
from sdcluster.config import Config, ConfigError, check_config
from sdcluster.data import sources
from sdcluster.data.hub import stage_data_for_launch
from sdcluster.data.reader import Row
from sdcluster.models.hub import stage_for_launch
from sdcluster.models.load import check_model_source
from sdcluster.redaction import reject_secrets
from sdcluster.runtime import ownership
from sdcluster.train.tracking import check_installed


def check_data(cfg: Config, remember: bool = False) -> list[Row]:
    """Refuse a training data folder with problems, before the queue; ``remember``: a launch that submits
    records which images decoded cleanly, so that the next launch decodes only new or changed ones (a dry
    run writes nothing). Returns the rows it read, for the pin (:mod:`sdcluster.data.snapshot`)."""
    from sdcluster.data.metadata import checked_rows

    folder = Path(cfg.data.path)
    if not folder.is_dir():
        raise ConfigError(
            f"data.path: {folder} is not a folder. Fix: data=imagefolder data.path=DIR (images + "
            "metadata.jsonl; make one with python -m sdcluster.data prepare DIR)"
        )
    # an image that decoded cleanly at an earlier launch and has not changed is not decoded again
    data = cfg.data
    rows, problems = checked_rows(folder, data.max_pixels, data.caption_column, cfg.cache_root, remember)
    if not problems:
        from sdcluster.data.split import holdout_split

        try:
            holdout_split(len(rows), cfg.data.holdout)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        return rows
    listing = "\n  ".join(str(p) for p in problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    raise ConfigError(
        f"data.path: {folder} has {len(problems)} problem(s):\n  {listing}{more}\n"
        f"Fix them, then check with: python -m sdcluster.data validate {folder}"
    )


@contextlib.contextmanager
def checks_together() -> Iterator[None]:
    """Around the preflights of a sweep's points: a data folder they share is checked and pinned once for
    all of them (:func:`sdcluster.data.metadata.read_once`)."""
    from sdcluster.data.metadata import read_once

    with read_once():
        yield


def check_generation_inputs(cfg: Config) -> None:
    prompts_file = cfg.generate.prompts_file
    if prompts_file and not Path(prompts_file).is_file():
        raise ConfigError(f"generate.prompts_file: {prompts_file} does not exist. Fix: give a text file path")
    # the schema stays a plain dataclass: parsing a prompt program is the generation wing's job
    from sdcluster.generate.prompts import check_program

    check_program(cfg.generate)
    if cfg.generates:  # counted, never expanded: refuses a plan above generate.max_images
        from sdcluster.generate.plan_count import check_plan_size

        check_plan_size(cfg.generate)
    if cfg.task == "generate":
        from sdcluster.generate.render import require_model

        require_model(paths.generation_model(cfg))


def check_scripts(cfgs: list[Config]) -> None:
    """Render every job script of ``cfgs`` as it would be submitted and let the backend check its shape
    before anything is queued (only ``cluster.setup`` lines are pasted unquoted)."""
    from sdcluster.cluster.submit import job_script, plan_jobs

    for job in plan_jobs(cfgs):
        backends.of(job.cfgs[0]).check_script(job.kind, job_script(job, "1" if job.after else None))


def check_family_settings(cfg: Config) -> list[str]:
    """Refuse a training setting the model's family cannot train with (read from the staged model's
    ``model_index.json``); returns what could not be checked (a hub model a dry run did not stage)."""
    if cfg.task == "generate":
        return []
    from sdcluster.model_source import is_embedded
    from sdcluster.models.embedded import embedded_family
    from sdcluster.models.family import family_of_folder
    from sdcluster.plan.sizes import model_folder

    if is_embedded(cfg.model.path):  # known without building it: a dry run writes nothing
        family = embedded_family(cfg.model.path)
    else:
        folder = model_folder(cfg)
        if folder is None:
            return [f"the settings {cfg.model.path}'s family supports (its configs are not staged here)"]
        family = family_of_folder(folder)
    family.refuse_settings(cfg.train)
    return []


def preflight(cfg: Config, dry_run: bool = False) -> tuple[Config, list[str]]:
    """Everything that can be checked before submission, in the order a user would fix it.

    Returns the config to submit (``cfg`` pinned to the staged hub commits and to the data it checked,
    ``data.snapshot``, and with ``train.epochs`` counted as ``train.max_steps``, which name the run
    folders; ``cfg`` itself is left unchanged) and the checks that could not run. Without a reachable
    scheduler only a dry run goes on (it prints what would be submitted and says what it could not
    check); a real submission stops there. Where the scheduler answers but cannot say a partition's
    limits, both go on and print what was not checked.
    """
    backend = backends.of(cfg)
    check_config(cfg)
    backend.check_config(cfg)  # what the chosen executor needs of the config: before staging or queries
    reject_secrets(dataclasses.asdict(cfg))
    check_model_source(cfg.model)
    unchecked: list[str] = []
    if cfg.reads_training_data:
        check_installed(cfg)
        # data=hub: pinned to its commit, data.path its staged folder, checked below as any folder is
        cfg = stage_data_for_launch(cfg, dry_run=dry_run)
        cfg = sources.stage_sources_for_launch(cfg, dry_run=dry_run)  # each hub source, as data=hub
        scanned = None  # each source's rows, as the check read them
        if cfg.data.sources:
            scanned = sources.check_sources(cfg, remember=not dry_run)  # each named in its problems
            unchecked += [f"the images of {s} (a dry run downloads none)" for s in sources.unstaged(cfg)]
        elif Path(cfg.data.path).is_dir() or not cfg.data.hub:
            scanned = [check_data(cfg, remember=not dry_run)]
        else:
            unchecked.append(f"the images of {cfg.data.name} (a dry run does not download a hub dataset)")
        if not dry_run and scanned is not None and None not in scanned:
            from sdcluster.data import snapshot

            cfg = snapshot.pin(cfg, scanned)  # what was checked: a job then reads it, not the folder
        if cfg.train.resume not in ("auto", "never"):
            from sdcluster.train.step_folders import resume_folder

            resume_folder(cfg.train.resume)
    if cfg.task != "generate" or not cfg.generate.model:  # the run's folder is named by its step count
        from sdcluster.data.epochs import resolve_length

        cfg = resolve_length(cfg)  # train.epochs as train.max_steps, counted from the data
    check_generation_inputs(cfg)
    # last of the checks (a typo in the data should not wait for a download); pins model.commit, which
    # names the run folders below
    cfg, _ = stage_for_launch(cfg, dry_run=dry_run)
    # after staging, which brings the model's configs here: the plan reads them (and imports torch only
    # when cluster.gpu_mem_gb asks for the check)
    from sdcluster.plan.fit import check_fits  # late: the plan's chain (config, models) is deep

    unplanned = check_fits(cfg) + check_family_settings(cfg)
    if cfg.trains:
        ownership.check_free(paths.run_dir(cfg), "run")
    if cfg.generates:
        ownership.check_free(paths.generation_dir(cfg), "generate")
    check_scripts([cfg])
    return cfg, unchecked + unplanned + backend.check(cfg, dry_run)
