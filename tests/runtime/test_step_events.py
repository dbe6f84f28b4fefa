"""The boundary seam of the job loops: observers see each training step and generation batch with the
job's flag, a ``stop_at`` observer stops training as a preemption does, and ``SDCLUSTER_TEST_PAUSE`` is one
observer that holds a job at its step until the flag is raised."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sdcluster.config import Config
from sdcluster.config.generate import GenerateConfig
from sdcluster.runtime import step_events
from sdcluster.runtime.requeue import PreemptionFlag
from sdcluster.runtime.step_events import TEST_PAUSE, boundary, observing, requested_pause, stop_at

QUICK = ["train.log_every=1", "train.batch_size=2", "train.checkpoint_every=100", "train.max_steps=4"]
QUICK += ["train.validate_every=0", "train.validation_prompts=[]"]


class CountingFlag:
    """A flag that is raised from its ``after``-th read on: how long a pause waited, counted in reads."""

    def __init__(self, after: int) -> None:
        self.after, self.reads = after, 0

    @property
    def raised(self) -> bool:
        self.reads += 1
        return self.reads >= self.after


def test_training_shows_each_step_to_its_observers_and_stops_where_one_raises_the_flag(make_cfg):
    from sdcluster.train.loop import train

    cfg = make_cfg(QUICK)
    seen: list[tuple[str, int, bool]] = []

    def record(unit: str, count: int, flag: step_events.Flag) -> None:
        assert isinstance(flag, PreemptionFlag)  # the job's own flag, not a copy
        seen.append((unit, count, flag.raised))

    # stop_at from step 2 on: were it still observing after its block, the resumed run would stop at 3
    with observing(record), stop_at(lambda step: step >= 2):
        first = train(cfg)
    assert first.interrupted and first.step == 2
    assert seen == [("step", 1, False), ("step", 2, False)]  # observers run in order: record before the stop
    assert (first.run_dir / "checkpoints" / "step-00000002").is_dir()  # saved as after a signal

    seen.clear()
    with observing(record):
        second = train(cfg)
    assert not second.interrupted and second.step == 4
    assert seen == [("step", 3, False), ("step", 4, False)]


def test_generation_shows_each_written_batch_and_its_stop(tmp_path: Path, tiny_model: Path):
    from sdcluster.generate.job import generate_images

    settings = dict(prompts=["dark blue jeans laid flat"], num_images=4, batch_size=2, steps=2)
    cfg = Config(
        generate=GenerateConfig(model=str(tiny_model), height=64, width=64, **settings),
        output_root=str(tmp_path),
    )
    seen: list[tuple[str, int, bool]] = []
    with observing(lambda unit, count, flag: seen.append((unit, count, flag.raised))):
        result = generate_images(cfg, should_stop=lambda: False)
    assert result.generated == 4 and not result.interrupted
    assert seen == [("batch", 1, False), ("batch", 2, False)]


def test_the_pause_holds_only_at_its_step_until_the_flag_is_raised(monkeypatch, caplog):
    monkeypatch.setenv(TEST_PAUSE, "step:2")
    elsewhere, there = CountingFlag(after=1), CountingFlag(after=4)
    with caplog.at_level(logging.INFO, logger="sdcluster"), requested_pause():
        boundary("step", 1, elsewhere)
        boundary("batch", 2, elsewhere)  # the same count of the other unit
        assert elsewhere.reads == 0 and "paused" not in caplog.text
        boundary("step", 2, there)
    assert there.reads == 4  # it waited until the flag was raised, and not a read longer
    assert f"paused at step 2 until a signal arrives ({TEST_PAUSE})" in caplog.text
    boundary("step", 2, elsewhere)  # the block is over: nothing observes
    assert elsewhere.reads == 0


def test_a_pause_never_signalled_ends_at_its_limit(monkeypatch):
    monkeypatch.setenv(TEST_PAUSE, "step:1")
    never = CountingFlag(after=10**9)
    with requested_pause(limit_s=0.0):
        boundary("step", 1, never)
    assert never.reads == 1  # read once, then the job goes on as if never paused


@pytest.mark.parametrize("value", [None, "step:1@1"])  # unset; meant for array task 1, and this is no task
def test_no_pause_is_observed_unless_the_variable_names_this_job(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(TEST_PAUSE, raising=False)
    else:
        monkeypatch.setenv(TEST_PAUSE, value)
    flag = CountingFlag(after=10**9)
    with requested_pause():
        boundary("step", 1, flag)
    assert flag.reads == 0
