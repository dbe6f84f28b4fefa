"""The backends own what the config needs of them, and staging hands back a new config.

What only one executor needs (one process locally; on SLURM a warning signal before the time limit, GPUs
for mixed precision, sbatch option names) is checked by its backend right after the cross-group checks,
before anything is staged or asked of a scheduler; the schema below the backends names none of them. The
launch's cluster-choice checks ask every registered backend, so a new one brings its own messages. Staging
pins the hub commit in a copy: the caller's config, a sweep point's included, stays as typed.
"""

from __future__ import annotations

import copy

import pytest

from sdcluster import paths
from sdcluster.cluster import backends
from sdcluster.cluster.choice import check_choice
from sdcluster.cluster.preflight import preflight
from sdcluster.config import ClusterConfig, ConfigError
from tests.conftest import compose
from tests.models.test_hub_staging import COMMIT, REPO_ID, hub  # noqa: F401 (the loopback hub fixture)


def test_the_local_backend_refuses_several_processes_before_the_data_is_read():
    cfg = compose(["cluster.tasks_per_node=2", "data=imagefolder", "data.path=/no/such/folder"])
    with pytest.raises(
        ConfigError, match=r"^cluster.tasks_per_node/nodes: the local executor runs one process"
    ):
        preflight(cfg, dry_run=True)


def test_slurm_needs_gpus_for_mixed_precision_before_the_data_is_read():
    cfg = compose(["+cluster=slurm", "train.mixed_precision=bf16", "data=imagefolder", "data.path=/nowhere"])
    with pytest.raises(
        ConfigError, match=r"^train.mixed_precision=bf16 needs GPUs but cluster.gpus_per_node=0"
    ):
        preflight(cfg, dry_run=True)
    local = compose(["+cluster=local", "train.mixed_precision=bf16"])
    backends.of(local).check_config(local)  # a local CPU run may ask for bf16


def test_the_signal_bound_is_the_slurm_backends_not_the_schemas():
    """The schema builds any executor's cluster block; SLURM, which sends the warning, refuses it."""
    assert ClusterConfig(name="slurm", timeout_min=2).signal_delay_s == 120
    cfg = compose(["+cluster=slurm", "cluster.timeout_min=2", "data=imagefolder", "data.path=/nowhere"])
    with pytest.raises(ConfigError, match=r"^cluster.signal_delay_s: got 120, must be below the time limit"):
        preflight(cfg, dry_run=True)
    local = compose(["+cluster=local", "cluster.timeout_min=2"])
    backends.of(local).check_config(local)  # the local executor sends no warning


class _PbsBackend:
    """A third scheduler, as a new backend module would add it: only what the choice checks ask."""

    name, title, foreground = "pbs", "PBS", False

    def own_keys(self) -> tuple[str, ...]:
        return ("qos",)

    def login_node(self, environ) -> str | None:
        return "qsub is on PATH" if environ.get("PBS_LOGIN") else None


def test_the_choice_checks_ask_every_registered_backend(monkeypatch):
    """Messages and fixes come from the backend that reads the key or owns the login node."""
    local = backends.get("local")
    monkeypatch.setattr(backends, "_BACKENDS", {"local": local, "pbs": _PbsBackend()})  # slurm gone too
    with pytest.raises(ConfigError, match=r"^cluster.qos: is a PBS setting, .*Fix: add \+cluster=pbs"):
        check_choice(compose(["cluster.qos=high"]), None, environ={})
    heavy = compose(["train.max_steps=1000"])
    with pytest.raises(ConfigError, match=r"looks like a PBS login node \(qsub is on PATH\).*\+cluster=pbs"):
        check_choice(heavy, None, environ={"PBS_LOGIN": "1", "PATH": ""})
    check_choice(heavy, "local", environ={"PBS_LOGIN": "1", "PATH": ""})  # chosen on purpose


@pytest.mark.usefixtures("hub")
def test_staging_returns_the_pinned_config_and_leaves_the_callers_unchanged(make_cfg, tmp_path):
    from sdcluster.models.hub import stage_for_launch

    cfg = make_cfg([f"model.path={REPO_ID}", "model.name=tiny-hub", f"model.cache_dir={tmp_path / 'hf'}"])
    typed = copy.deepcopy(cfg)
    pinned, staged = stage_for_launch(cfg, dry_run=True, say=lambda _: None)
    assert staged is not None and pinned.model.commit == COMMIT
    assert cfg == typed and cfg.model.commit is None, "the caller's config was changed"
    assert paths.run_dir(pinned) != paths.run_dir(cfg), "the pinned commit names the run"

    submitted, unchecked = preflight(cfg, dry_run=True)
    assert cfg == typed and unchecked == []
    assert submitted == pinned


@pytest.mark.usefixtures("hub")
def test_launch_and_sweep_submit_the_pinned_config(make_cfg, tmp_path):
    from sdcluster.cluster.submit_and_wait import launch
    from sdcluster.sweep.points import Point, submit_sweep

    hub_model = [f"model.path={REPO_ID}", "model.name=tiny-hub", f"model.cache_dir={tmp_path / 'hf'}"]
    cfg = make_cfg([*hub_model, "launch.dry_run=true"])
    said: list[str] = []
    assert launch(cfg, say=said.append) == 0
    assert f"commit: '{COMMIT}'" in "\n".join(said) and cfg.model.commit is None

    points = [
        Point(make_cfg([*hub_model, "launch.dry_run=true", f"optim.lr={lr}"]), []) for lr in (1e-4, 5e-5)
    ]
    typed = [copy.deepcopy(p.cfg) for p in points]
    said.clear()
    assert submit_sweep(points, say=said.append) == 0
    assert f"commit: '{COMMIT}'" in "\n".join(said)
    assert [p.cfg for p in points] == typed, "the sweep's points were changed"
