"""The newcomer's command: ``python -m sdcluster.launch`` trains and generates through the local executor."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TOKEN = "hf_NotARealTokenJustShapedLikeOne4242"
WANDB_KEY = "feedc0de" * 5  # W&B's shape: 40 hex digits


def _launch(tmp: Path, cache_root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable,
        "-m",
        "sdcluster.launch",
        "debug=fast",
        f"output_root={tmp / 'outputs'}",
        f"jobs_root={tmp / 'jobs'}",
        f"cache_root={cache_root}",
        *extra,
    ]
    env = {**os.environ, "HF_TOKEN": TOKEN, "WANDB_API_KEY": WANDB_KEY, "SDCLUSTER_HOME": str(tmp / "home")}
    return subprocess.run(args, capture_output=True, text=True, cwd=tmp, timeout=600, env=env)


def test_default_run_trains_generates_and_a_rerun_resumes(tmp_path, cache_root, tiny_model):
    from diffusers import StableDiffusionPipeline

    proc = _launch(tmp_path, cache_root, "train.tracker=tensorboard")  # event files get the config too
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = Path(re.search(r"^model:\s+(\S+)", proc.stdout, re.M).group(1))
    images = Path(re.search(r"^images:\s+(\S+)", proc.stdout, re.M).group(1))
    train_id, gen_id = re.findall(r"^submitted \w+ job (\S+):", proc.stdout, re.M)
    for job_id in (train_id, gen_id):
        record = json.loads((tmp_path / "jobs" / job_id / "job.json").read_text())
        assert record["state"] == "COMPLETED" and record["job_id"] == job_id
        assert (tmp_path / "jobs" / job_id / f"{job_id}_0_log.out").is_file()
        assert (tmp_path / "jobs" / job_id / "config.yaml").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(model)
    assert pipe("jeans", num_inference_steps=2, height=64, width=64).images[0].size == (64, 64)
    records = [json.loads(ln) for ln in (images / "manifest.jsonl").read_text().splitlines()]
    assert len(records) == 2 and {r["file"] for r in records} == {p.name for p in images.glob("p*.png")}
    finished = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in images.glob("p*.png")}

    again = _launch(tmp_path, cache_root, "train.tracker=tensorboard")  # the same command: resume, skip
    assert again.returncode == 0, again.stderr[-3000:]
    train2, gen2 = re.findall(r"^submitted \w+ job (\S+):", again.stdout, re.M)
    train_log = (tmp_path / "jobs" / train2 / f"{train2}_0_log.out").read_text()
    assert "resumed from" in train_log and "step-00000004" in train_log
    gen_log = (tmp_path / "jobs" / gen2 / f"{gen2}_0_log.out").read_text()
    assert "2 already done" in gen_log
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in images.glob("p*.png")} == finished

    assert list((model.parent / "tensorboard").glob("events.out.tfevents.*")), "event files were written"
    for path in [*tmp_path.rglob("*"), *cache_root.rglob("*")]:  # jobs, outputs, pickles, events, caches
        if path.is_file():
            data = path.read_bytes()
            assert TOKEN.encode() not in data and WANDB_KEY.encode() not in data, f"secret leaked into {path}"
