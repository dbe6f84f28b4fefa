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
    if cfg.task != "generate":
        say(f"run folder:   {paths.run_dir(cfg)}")
        run = paths.run_paths(cfg)
        if cfg.train.trains_adapters:  # the adapters file, and a fused pipeline when asked for
            say(f"lora:         {run.lora}")
        if cfg.train.exports_pipeline:
            say(f"model:        {run.model}")
    if cfg.task != "train":
        # Here, not at the top: the login side sits above generate, but only a dry run of generation
        # needs its plan, and generate's own import chain is long (plan -> records -> gallery -> ...).
        from sdcluster.generate.plan_count import describe_counts

        say(f"images:       {paths.generation_dir(cfg)}")
        for line in describe_counts(cfg.generate):  # per template, per shard, in total: counted, not listed
            say(line)


def dry_run(cfgs: list[Config], say: Say, unchecked: list[str]) -> int:
    """Print the resolved config(s) and exactly what would be submitted; submit nothing."""
    say("# resolved config (nothing submitted: launch.dry_run=true)")
    say(config_yaml(cfgs[0]))
    describe_dry_run(cfgs, say)
    for note in unchecked:
        say(f"# not checked: {note}")
    if len(cfgs) == 1:
        describe_outputs(cfgs[0], say)
    return 0
