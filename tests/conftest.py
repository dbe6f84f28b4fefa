"""Shared fixtures: config composed through Hydra as the entry point does, the tiny model, the cluster."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["tests.slurm_cluster"]


# Parallel workers (``make test``: ``pytest -n N --dist loadgroup``) run each group below on one worker, one
# test after another. Every other test may run beside any other: each has its own tmp folder, and its
# SLURM jobs log under it (tests/slurm_cluster.py cancels exactly those).
_GROUP_OF_FIXTURE = {
    # the two-node sandbox: one per machine (fixed namespace names), started and stopped as a whole
    "_two_node_sandbox": "slurm_two_nodes",
}
SERIAL_GROUP = "slurm_serial"
"""``slurm_serial`` tests: they also hold the single node alone (tests/slurm_cluster.py); grouped, they
queue on one worker instead of each blocking a worker while another has the node."""


def pytest_configure(config: pytest.Config) -> None:
    """Parallel workers only with ``--dist loadgroup``: the groups below are what keep one two-node sandbox
    per machine and the node-alone tests off the other workers, not a speed-up."""
    workers = config.getoption("numprocesses", default=None)
    dist = config.getoption("dist", default="no")
    if workers and dist != "loadgroup" and not hasattr(config, "workerinput"):
        raise pytest.UsageError(
            f"pytest -n {workers} with --dist {dist}: the SLURM tests need their groups kept on one worker "
            "each. Fix: add --dist loadgroup (as make test does)"
        )


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups and ``-m`` deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Groups for parallel workers, from markers and fixtures, so a new test needs nothing special; and
    ``gpu`` tests are deselected, not skipped, without a CUDA device: a skip would read as coverage."""
    for item in items:
        if item.get_closest_marker("slurm_serial"):
            item.add_marker(pytest.mark.slurm)  # it holds the SLURM node, so it is a SLURM test
            item.add_marker(pytest.mark.xdist_group(SERIAL_GROUP))
        for fixture, group in _GROUP_OF_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(group))
    import torch

    if torch.cuda.is_available():
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]


REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# Idle OpenMP threads sleep instead of spinning. The suite runs more processes than the machine has cores
# (parallel workers, each job's ranks): libgomp's default spin-wait then burns the cores the others need
# (one training test took 2.5x the CPU time under that load). The thread counts stay as they are, so float
# reductions, and every bit-exact comparison, are unchanged. libgomp reads it when torch loads: pytest loads
# this file first, and the workers, the local jobs and the SLURM jobs inherit it (sbatch passes the
# environment on); a script that imports this module after torch only passes it on to its children.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def compose(overrides: list[str] | None = None):
    """Compose ``conf/`` exactly as ``python -m sdcluster.launch`` does and build the typed Config."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sdcluster.launch import to_config

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return to_config(hydra_compose(config_name="config", overrides=overrides or []))


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the whole run: the tiny model is built once (~10 s), not once per worker.

    Parallel workers share the run's folder (their own tmp folders are ``popen-gwN`` inside it); the
    cache is made for concurrent jobs (built under a temporary name, published by rename).
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "cache"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_model(cache_root: Path) -> Path:
    """The tiny SD 1.x model in ``cache_root``; the first worker builds it, the others wait on a lock
    (``ensure_tiny_model`` is safe without one, but every racing worker would build a copy)."""
    from sdcluster.models.embedded import ensure_tiny_model

    with open(cache_root / ".tiny-model.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return ensure_tiny_model(cache_root)


@pytest.fixture(scope="session", autouse=True)
def _sdcluster_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The index of job folders (``$SDCLUSTER_HOME/jobs.tsv``) in this session's tmp folder, not the
    user's ``~/.sdcluster``: in-process jobs record themselves there, and workers must not read one
    another's entries. Tests that look at the index set their own."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SDCLUSTER_HOME", str(tmp_path_factory.mktemp("sdcluster-home")))
        yield


@pytest.fixture
def make_cfg(tmp_path: Path, cache_root: Path, tiny_model: Path):
    """``make_cfg(["train.max_steps=4"])``: a composed config writing under this test's tmp folder."""

    def make(overrides: list[str] | None = None):
        base = [
            f"output_root={tmp_path / 'outputs'}",
            f"jobs_root={tmp_path / 'jobs'}",
            f"cache_root={cache_root}",
        ]
        return compose(base + (overrides or []))

    return make


def copy_sample(dest: Path, count: int | None = None, row: Callable[[dict], dict] = lambda r: r) -> Path:
    """The first ``count`` shipped sample images (all by default) with each metadata line passed through
    ``row`` (e.g. a caption suffix, for a fresh latent-cache key, or captions under another column)."""
    from sdcluster.paths import sample_data_dir

    rows = [json.loads(line) for line in (sample_data_dir() / "metadata.jsonl").read_text().splitlines()]
    dest.mkdir(parents=True)
    with open(dest / "metadata.jsonl", "w") as fh:
        for entry in rows[:count]:
            shutil.copy(sample_data_dir() / entry["file_name"], dest / entry["file_name"])
            fh.write(json.dumps(row(entry)) + "\n")
    return dest


def tensorboard_scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar as TensorBoard shows it: every event file in ``folder``, purges applied."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def tensorboard_images(folder: Path, tag: str) -> list[tuple[int, tuple[int, int]]]:
    """(step, (width, height)) of each image logged under ``tag``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0})
    events.Reload()
    return [(e.step, (e.width, e.height)) for e in events.Images(tag)]


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision is fixed by the first Accelerator; a
    job is a process of its own, but these tests train in one process, so reset it around a change."""
    from accelerate.state import AcceleratorState, GradientState

    def reset() -> None:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    reset()
    yield
    reset()


CHROMIUM = Path("/usr/bin/chromium")  # Debian's (make browser-packages); playwright drives it


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium for the pages the suite opens (the gallery, the docs site), one per module."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is missing. Fix: pip install -e '.[test]' (make install-test)")
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing. Fix: make browser-packages (apt-get install chromium)")
    args = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
    ]
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
        yield launched
        launched.close()
