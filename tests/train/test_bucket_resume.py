"""A run on aspect-ratio buckets preempted mid-epoch resumes bit for bit, from the latent cache and from
images alike: which bucket and which images a micro-step reads is a function of the seed and the step."""

from __future__ import annotations

import logging

import pytest

from sdcluster.runtime.step_events import stop_at
from sdcluster.train.loop import train
from tests.data.test_buckets import TINY, make_bucket_folder
from tests.train.test_loop import FAST, _assert_bitwise_equal, _final_weights

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("cache", ["true", "false"])
def test_bucketed_run_preempted_mid_epoch_resumes_bitwise(make_cfg, tmp_path, caplog, cache):
    """5 images in 3 buckets at a global batch of 2: an epoch is 3 micro-steps (one per bucket), so a stop
    at step 2 is inside the first epoch, and the run goes on into the second."""
    logging.getLogger("sdcluster").addHandler(caplog.handler)  # the job's logging stops at its handler
    caplog.set_level(logging.INFO, logger="sdcluster")
    folder = make_bucket_folder(tmp_path / "data", suffix=f" resume {cache}")
    overrides = [
        *FAST,
        *TINY,
        "data=imagefolder",
        f"data.path={folder}",
        f"data.cache={cache}",
        "train.max_steps=5",
        "optim.lr_schedule=cosine",
        "optim.warmup_steps=1",
    ]
    straight = train(make_cfg([*overrides, f"output_root={tmp_path / 'a'}"]))
    assert (
        "data.buckets: 48x80: 2, 64x64: 1, 80x48: 2 images per bucket; 3 micro-steps an epoch" in caplog.text
    )
    assert ("latent cache: " in caplog.text) == (cache == "true")

    cfg = make_cfg([*overrides, f"output_root={tmp_path / 'b'}"])
    with stop_at(lambda step: step == 2):
        first = train(cfg)
    assert first.interrupted and first.step == 2
    second = train(cfg)
    assert not second.interrupted and second.step == 5

    _assert_bitwise_equal(_final_weights(straight.run_dir), _final_weights(second.run_dir))
    assert second.losses == [pair for pair in straight.losses if pair[0] > 2]
