"""The job keeps its own clock: from the scheduler's end time and the time its steps (batches) and saves
take, it saves and requeues before a time limit that comes without a warning it hears.

The rule on a clock a test moves by hand; training and generation stopping where it says; and on the real
sandbox, a job whose warning signal nobody handles (SIGURG: a site that blocks user signals, as the job sees
it) saving before its 2-minute limit and resuming from that checkpoint in its requeued attempt.
"""

from __future__ import annotations

import re

import pytest

from sdcluster.config import Config
from sdcluster.config.generate import GenerateConfig
from sdcluster.runtime import step_events
from sdcluster.runtime.requeue import JobClock, JobStopped, PreemptionFlag, requeue_or_stop
from sdcluster.train import step_folders
from tests.slurm_helpers import job_record, launch, sacct_history, wait_for

QUICK = ["train.log_every=1", "train.batch_size=2", "train.checkpoint_every=100", "train.max_steps=10"]
QUICK += ["train.validate_every=0", "train.validation_prompts=[]"]


class HandClock:
    """Time that moves only when the test says: ``tick(s)`` at each boundary stands for a unit of ``s``."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def ticking(self, seconds: float) -> step_events.Observer:
        def tick(unit: str, count: int, flag: step_events.Flag) -> None:
            self.now += seconds

        return tick


def test_the_clock_expects_the_longest_unit_and_save_and_leaves_the_first_interval_behind():
    hand = HandClock()
    clock = JobClock(end_time=200.0, margin_s=20.0, now=hand)
    clock.expect_save(30.0)
    hand.now = 50.0  # start-up: model load and resume
    clock.lap()
    assert clock.unit_s == 50.0  # the only interval yet stands in for a unit
    hand.now = 55.0
    clock.lap()
    assert clock.unit_s == 5.0  # the first real unit replaces it
    clock.saved(8.0)  # a periodic save inside the next interval is not part of the unit
    hand.now = 55.0 + 8.0 + 7.0
    clock.lap()
    assert (clock.unit_s, clock.save_s) == (7.0, 8.0)  # the timed save replaced the guess
    hand.now = 70.0 + 4.0
    clock.lap()
    assert clock.unit_s == 7.0  # the longest so far
    hand.now = 164.9  # 35.1 s left > 7 + 8 + 20
    assert clock.fits()
    hand.now = 165.1  # 34.9 s left: the next step and a save would end inside the margin
    assert not clock.fits()
    assert JobClock(end_time=None, now=hand).fits()  # no end time: never out of time


def test_training_saves_where_the_next_step_and_a_save_would_not_fit(make_cfg):
    from sdcluster.train.loop import train

    cfg = make_cfg(QUICK)
    hand, flag = HandClock(), PreemptionFlag()
    flag.clock = JobClock(end_time=100.0, margin_s=20.0, now=hand)
    # each step "takes" 10 s; the untimed save is guessed at about 5 s (tiny model): after step 6, 40 s are
    # left for 10 + 5 + 20; after step 7, 30 s are not enough
    with step_events.observing(hand.ticking(10.0), flag.keep_time):
        result = train(cfg, flag=flag)
    assert result.interrupted and result.step == 7
    assert flag.out_of_time and flag.signal_time is None
    saved = step_folders.complete_checkpoints(result.run_dir / "checkpoints")
    assert [step_folders.read_meta(folder).step for folder in saved] == [7]
    # a backend that does not requeue says it was the clock, not a signal
    with pytest.raises(JobStopped, match=r"^timeout \(the job's own clock\) at step 7; state saved"):
        requeue_or_stop(cfg, None, flag, result.step, started=0.0)

    again = train(cfg)  # no clock: the same run resumes from that checkpoint and finishes
    assert not again.interrupted and again.step == 10


def test_generation_finishes_the_batch_and_stops_before_one_that_would_not_fit(tmp_path, tiny_model):
    from sdcluster.generate.job import generate_images

    settings = dict(prompts=["dark blue jeans laid flat"], num_images=8, batch_size=2, steps=2)
    cfg = Config(
        generate=GenerateConfig(model=str(tiny_model), height=64, width=64, **settings),
        output_root=str(tmp_path),
    )
    hand, flag = HandClock(), PreemptionFlag()
    flag.clock = JobClock(end_time=60.0, margin_s=20.0, now=hand)
    # batches of 15 s, no save: after batch 1, 45 s are left for 15 + 20; after batch 2, 30 s are not
    with step_events.observing(hand.ticking(15.0), flag.keep_time):
        result = generate_images(cfg, should_stop=lambda: flag.raised)
    assert result.interrupted and result.generated == 4 and flag.out_of_time
    rest = generate_images(cfg)
    assert (rest.skipped, rest.generated, rest.interrupted) == (4, 4, False)


@pytest.mark.slurm
def test_a_time_limit_without_a_warning_saves_and_requeues_on_the_jobs_own_clock(
    slurm_cluster, tmp_path, cache_root
):
    run = ["task=train", "train.log_every=1", "train.checkpoint_every=100", "train.max_steps=60"]
    run += ["train.validate_every=0", "cluster.tasks_per_node=2", "cluster.cpus_per_task=1"]
    # The warning goes to SIGURG, which no process handles (its default is to ignore it); the first
    # attempt's steps take 3 s more each (SDCLUSTER_TEST_SLOW), so the 2-minute limit falls mid-run: its 60
    # steps need over 3 minutes, more than the limit and the half minute SLURM may take to enforce it.
    limits = [
        "cluster.timeout_min=2",
        "cluster.signal_delay_s=60",
        "+cluster.additional_parameters.signal=URG@60",
    ]
    slow = {step_events.TEST_SLOW: "step:3"}
    proc, ids = launch(tmp_path, cache_root, *run, *limits, env=slow)
    assert proc.returncode == 0, proc.stderr
    (job_id,) = ids["train"]
    assert wait_for(job_id, timeout_s=300)[0] == "COMPLETED"

    # the first run left before SLURM's limit: requeued by the job, not ended by the scheduler (TIMEOUT)
    assert sacct_history(job_id) == ["REQUEUED", "COMPLETED"]
    record = job_record(tmp_path, job_id)
    first, second = record["attempts"]
    assert (first["state"], first["requeued"]) == ("TIMEOUT", True)
    assert first["exit_reason"] == "timeout (the job's own clock)"
    assert 0 < first["step"] < 60
    assert (second["state"], second["restart_count"], second["step"]) == ("COMPLETED", 1, 60)
    log = (tmp_path / "jobs" / job_id / f"{job_id}_0_log.out").read_text()
    assert re.search(r"\d+ s left before the time limit, a step takes up to", log)
    assert f"resumed from {record['run_dir']}/checkpoints/step-{first['step']:08d}" in log
    # every rank of the requeued attempt started from that step: the stop was collective
    for rank in (0, 1):
        text = (tmp_path / "jobs" / job_id / f"{job_id}_{rank}_log.out").read_text()
        assert f"steps {first['step']}->60" in text
