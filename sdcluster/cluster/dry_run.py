"""``launch.dry_run=true``: print the resolved config(s) and exactly what would be submitted; submit nothing.

Apart from :mod:`sdcluster.cluster.submit_and_wait` (which waits on jobs and talks to the scheduler) so that a
sweep's dry run (:mod:`sdcluster.sweep.points`) reaches it without the launcher's imports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from sdcluster import paths
from sdcluster.cluster.submit import describe_dry_run
from sdcluster.redaction import config_yaml

if TYPE_CHECKING:
    from sdcluster.config import Config

Say = Callable[[str], None]


def describe_outputs(cfg: Config, say: Say) -> None:
    if cfg.task == "cache":
        say(f"latent cache: {paths.latent_cache_dir(cfg)}/<key> (the key: logged by the job)")
    if cfg.trains:
        say(f"run folder:   {paths.run_dir(cfg)}")
        run = paths.run_paths(cfg)
        if cfg.train.trains_adapters:  # the adapters file, and a fused pipeline when asked for
            say(f"lora:         {run.lora}")
        if cfg.train.exports_pipeline:
            say(f"model:        {run.model}")
    if cfg.generates:
        # Here, not at the top: the login side sits above generate, but only a dry run of generation
        # needs its plan, and generate's own import chain is long (plan -> records -> gallery -> ...).
        from sdcluster.generate.plan_count import describe_counts

        say(f"images:       {paths.generation_dir(cfg)}")
        for line in describe_counts(cfg.generate):  # per template, per shard, in total: counted, not listed
            say(line)


def describe_memory(cfg: Config, say: Say) -> None:
    """The training job's memory plan per GPU (:mod:`sdcluster.plan`), for a job on GPUs or with
    ``cluster.gpu_mem_gb`` set: planning imports torch and diffusers (seconds on a login node), which a
    dry run of a CPU job does not need."""
    if not cfg.trains or (cfg.cluster.gpus_per_node == 0 and cfg.cluster.gpu_mem_gb is None):
        return
    from sdcluster.plan.fit import describe, plan_config  # see describe_outputs: torch loads late

    planned = plan_config(cfg)
    for line in describe(planned) if planned else ["memory plan: not made, the model is not staged here"]:
        say(line)


def describe_points(cfgs: list[Config], say: Say, labels: list[str] | None = None) -> None:
    """A sweep's points, two or three lines each: the run folder, the image folder and how many images.

    Every point, not only the first: points differ in what they write. ``labels`` (what each point sweeps)
    head each point's lines.
    """
    from sdcluster.generate.plan_count import count_plan  # see describe_outputs: generate loads late

    for i, cfg in enumerate(cfgs):
        say(f"point {i}" + (f" {labels[i]}" if labels else ""))
        if cfg.trains:
            say(f"  run folder: {paths.run_dir(cfg)}")
        if cfg.generates:
            count = count_plan(cfg.generate)
            total = 1 if cfg.generate.only else count.total
            shards = f" over {len(count.shards)} shards" if len(count.shards) > 1 else ""
            say(f"  images:     {paths.generation_dir(cfg)} ({total:,} images{shards})")


def dry_run(cfgs: list[Config], say: Say, unchecked: list[str], labels: list[str] | None = None) -> int:
    """Print the resolved config(s) and exactly what would be submitted; submit nothing. A sweep's points
    (``labels``: what each one sweeps) are listed each with its folders and image count."""
    say("# resolved config (nothing submitted: launch.dry_run=true)")
    say(config_yaml(cfgs[0]))
    describe_dry_run(cfgs, say)
    for note in unchecked:
        say(f"# not checked: {note}")
    if len(cfgs) == 1:
        describe_outputs(cfgs[0], say)
        describe_memory(cfgs[0], say)
    else:
        describe_points(cfgs, say, labels)
    return 0
