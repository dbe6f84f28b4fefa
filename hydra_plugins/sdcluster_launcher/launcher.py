"""The Hydra launcher that turns a multirun into one sdcluster sweep.

Hydra calls a launcher with every point of ``-m`` at once: the intended place to decide how points run. On
SLURM every point is composed and validated first, then all are submitted together by
:func:`sdcluster.sweep.points.submit_sweep` (one job array, nothing queued if any point is wrong, the login
node returns at once). With the local executor the points run one after another as plain launches, exactly
as Hydra's basic launcher runs them. Kept thin and light to import: Hydra imports every plugin at start-up.
Its config node (``hydra/launcher=sdcluster``) is registered by :func:`sdcluster.config.store.register`.
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
        loader = self.hydra_context.config_loader
        composed = [loader.load_sweep_config(self.config, list(overrides)) for overrides in job_overrides]
        executors = {str(c.cluster.name) for c in composed}
        if executors == {"local"}:
            return super().launch(job_overrides, initial_job_idx)
        from sdcluster.config import ConfigError
        from sdcluster.launch import fail, to_config
        from sdcluster.sweep.points import Point, submit_sweep

        try:
            if len(executors) > 1:
                raise ConfigError(
                    f"cluster: the points use different executors {sorted(executors)}. Fix: sweep one of them"
                )
            points = [
                Point(to_config(_task(c)), list(o)) for c, o in zip(composed, job_overrides, strict=True)
            ]
            code = submit_sweep(points)
        except ConfigError as err:
            fail(err)
        if code:
            sys.exit(code)
        return [
            JobReturn(overrides=list(o), status=JobStatus.COMPLETED, _return_value=0) for o in job_overrides
        ]
