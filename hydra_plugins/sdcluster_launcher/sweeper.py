"""Hydra's basic sweeper, minus the copy of the composed config it writes before any point is checked.

``BasicSweeper.sweep`` saves the whole multirun config, in clear, to ``<hydra.sweep.dir>/multirun.yaml``
before the launcher sees a point: a token from ``conf/local/`` was on disk although the sweep was then
refused. sdcluster's records (``jobs/<id>/config.yaml``, the run folders, ``sweep.json``) are written after
the checks and redacted, so this sweeper writes nothing; otherwise it expands and batches the points as the
basic one does (its ``split_arguments``, ``get_job_batch``, ``validate_batch_is_legal``). Its config node
(``hydra/sweeper=sdcluster``) is registered by :func:`sdcluster.config.store.register`.
"""

from __future__ import annotations

from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser


class SdclusterSweeper(BasicSweeper):
    def sweep(self, arguments: list[str]) -> Any:
        """``BasicSweeper.sweep`` without its ``mkdir`` of the sweep folder and ``multirun.yaml``."""
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        self.overrides = self.split_arguments(overrides, self.max_batch_size)
        returns = []
        initial_job_idx = 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=initial_job_idx)
            for result in results:
                _ = result.return_value  # raises if the job failed, as in the basic sweeper
            initial_job_idx += len(batch)
            returns.append(results)
        return returns
