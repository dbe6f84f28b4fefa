"""The Hydra launcher that turns a multirun into one sdcluster sweep.

Hydra calls a launcher with every point of ``-m`` at once: the intended place to decide how points run.
Every point is composed and built first (schema, tokens, choice of executor: nothing runs if one is wrong).
On SLURM all are then submitted together by :func:`sdcluster.sweep.points.submit_sweep` (one job array,
nothing queued if any point fails its checks, the login node returns at once). With the local executor the
points run one after another as plain launches, exactly as Hydra's basic launcher runs them. Kept thin and
light to import: Hydra imports every plugin at start-up. Its config node (``hydra/launcher=sdcluster``) is
registered by :func:`sdcluster.config.store.register`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, open_dict


def _task(config: DictConfig) -> DictConfig:
    """The point's own config, as Hydra hands it to a task function: without the ``hydra`` node."""
    config = config.copy()
    with open_dict(config):
        del config["hydra"]
    return config


class SdclusterLauncher(BasicLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.hydra_context is not None and self.config is not None
        from sdcluster.atomic import DiskFullError
        from sdcluster.cluster import backends
        from sdcluster.config import ConfigError
        from sdcluster.launch import fail, fail_disk_full, to_config
        from sdcluster.sweep.points import Point, submit_sweep

        loader = self.hydra_context.config_loader
        composed = [loader.load_sweep_config(self.config, list(overrides)) for overrides in job_overrides]
        try:
            # every point passes the schema, the secret check and the executor checks before any runs
            cfgs = [to_config(_task(c), c.hydra.runtime.choices) for c in composed]
            chosen = {backends.of(cfg).name: backends.of(cfg) for cfg in cfgs}
            executors = set(chosen)
            if len(chosen) == 1 and next(iter(chosen.values())).foreground:  # one after another, here
                return super().launch(job_overrides, initial_job_idx)
            if len(executors) > 1:
                raise ConfigError(
                    f"cluster: the points use different executors {sorted(executors)}. Fix: sweep one of them"
                )
            code = submit_sweep([Point(cfg, list(o)) for cfg, o in zip(cfgs, job_overrides, strict=True)])
        except ConfigError as err:
            fail(err)
        except DiskFullError as err:
            fail_disk_full(err)
        if code:
            sys.exit(code)
        return [
            JobReturn(overrides=list(o), status=JobStatus.COMPLETED, _return_value=0) for o in job_overrides
        ]
