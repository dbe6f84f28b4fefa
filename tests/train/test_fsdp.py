"""train.strategy=fsdp: two CPU ranks (gloo) train like DDP, resume bit-exact, export whole, re-shard on load.

Each run is N local processes started the way a scheduler's tasks start: RANK, WORLD_SIZE and the
rendezvous in the environment, :func:`sdcluster.runtime.distributed.setup`, then the job function.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdcluster.train import step_folders
from tests.conftest import REPO

pytestmark = pytest.mark.slow

# One rank: argv = rank, world, port, result file, stop step (0: none), overrides...
_RANK = """
import json, logging, os, sys
logging.basicConfig(level=logging.INFO)  # the job's log lines ("resumed from ...") as a job's log has them
rank, world, port, out, stop = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
if world > 1:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
from sdcluster.runtime import distributed
distributed.setup(use_gpus=False)
from sdcluster.runtime.step_events import stop_at
from sdcluster.train.loop import train
from tests.conftest import compose
with stop_at(lambda step: step == stop):
    r = train(compose(sys.argv[6:]))
if rank == 0:
    json.dump({"losses": r.losses, "run_dir": str(r.run_dir), "step": r.step, "interrupted": r.interrupted,
               "model_dir": str(r.model_dir) if r.model_dir else None}, open(out, "w"))
"""

RUN = [
    "train.log_every=1",
    "train.checkpoint_every=100",
    "train.validate_every=0",
    "train.validation_prompts=[]",
    "train.use_ema=true",
    "train.ema_decay=0.9",  # an EMA far from the weights after a few steps: a mix-up would show
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks(tmp: Path, world: int, overrides: list[str], stop: int = 0) -> dict:
    """Run the job on ``world`` local processes; rank 0's result."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["SLURM_CPUS_PER_TASK"] = "1"  # one thread a rank: the same float reductions in every run
    out, port = tmp / f"result-{_free_port()}.json", str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK, str(rank), str(world), port, str(out), str(stop), *overrides],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log[-4000:]
    return {**json.loads(out.read_text()), "log": logs[0]}


def _base(make_cfg, name: str) -> list[str]:
    """Where a run of this test writes: its own output root, the session's model cache."""
    cfg = make_cfg()
    where = Path(cfg.output_root) / name
    return [f"output_root={where}", f"jobs_root={cfg.jobs_root}", f"cache_root={cfg.cache_root}"]


def _sharded_state(checkpoint: Path, tmp: Path) -> dict:
    """A DCP checkpoint's whole tensors (model, optimizer, EMA), gathered into one file and read back."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dest = tmp / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint / "sharded", dest)
    return torch.load(dest, weights_only=False)


def _flat(state: dict, prefix: str = "") -> dict[str, object]:
    found: dict[str, object] = {}
    for key, value in state.items():
        if isinstance(value, dict):
            found |= _flat(value, f"{prefix}{key}.")
        else:
            found[f"{prefix}{key}"] = value
    return found


def _assert_bitwise(a: dict, b: dict) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        if isinstance(fa[key], torch.Tensor):
            assert torch.equal(fa[key], fb[key]), f"{key} differs"
        else:
            assert fa[key] == fb[key], key


def _newest(run_dir: str) -> Path:
    return step_folders.complete_checkpoints(Path(run_dir) / "checkpoints")[0]


def test_two_fsdp_ranks_train_like_ddp_and_export_the_gathered_weights(make_cfg, tmp_path):
    """The same seed, the same data on the same ranks: the losses agree to float32 rounding.

    The tolerance: DDP all-reduces gradients in buckets, FSDP reduce-scatters each block's; the sums are the
    same numbers added in another order, a relative 1e-7 in float32 that a few Adam steps carry forward, far
    below the 1e-2 a wrong shard (a lost half of the gradient, an unaveraged rank) would move the loss.
    """
    steps = ["train.max_steps=4"]
    ddp = _ranks(tmp_path, 2, [*_base(make_cfg, "ddp"), *RUN, *steps])
    fsdp = _ranks(tmp_path, 2, [*_base(make_cfg, "fsdp"), *RUN, *steps, "train.strategy=fsdp"])
    assert [s for s, _ in fsdp["losses"]] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(ddp["losses"], fsdp["losses"], strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=0)

    newest = _newest(fsdp["run_dir"])
    meta = step_folders.read_meta(newest)
    assert meta.world_size == 2 and not (newest / "model.safetensors").exists()
    shards = {name for name in meta.files if name.startswith("sharded/")}
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp", "sharded/.metadata"} <= shards
    assert all(len(meta.files[name]["sha256"]) == 64 for name in shards)

    # the export is one plain diffusers pipeline holding the EMA of the whole gathered model, bit for bit
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(fsdp["model_dir"])
    exported = load_file(str(Path(fsdp["model_dir"]) / "unet" / "diffusion_pytorch_model.safetensors"))
    ema = _sharded_state(newest, tmp_path)["ema"]
    assert exported.keys() == ema.keys()
    assert all(torch.equal(exported[name], ema[name]) for name in ema)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"  # a plain module, not FSDP's sharded one


def test_a_stopped_fsdp_run_resumes_bit_exact_on_the_same_ranks(make_cfg, tmp_path):
    run = [*RUN, "train.strategy=fsdp", "train.max_steps=5", "optim.lr_schedule=cosine", "train.grad_accum=2"]
    straight = _ranks(tmp_path, 2, [*_base(make_cfg, "a"), *run])
    first = _ranks(tmp_path, 2, [*_base(make_cfg, "b"), *run], stop=2)
    assert first["interrupted"] and first["step"] == 2
    second = _ranks(tmp_path, 2, [*_base(make_cfg, "b"), *run])
    assert "resumed from" in second["log"] and second["step"] == 5
    assert second["losses"] == [pair for pair in straight["losses"] if pair[0] > 2]
    end_a, end_b = _newest(straight["run_dir"]), _newest(second["run_dir"])
    _assert_bitwise(_sharded_state(end_a, tmp_path), _sharded_state(end_b, tmp_path))


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_a_sharded_checkpoint_loads_on_another_number_of_ranks(make_cfg, tmp_path, before, after):
    """DCP re-shards on load: the weights and EMA loaded on the new number of ranks are the saved ones
    exactly (the export right after the load equals the checkpoint); training on continues from there with
    the data order of the new shape, so not bit for bit as an unchanged run would."""
    run = [*RUN, "train.strategy=fsdp"]
    saved = _ranks(tmp_path, before, [*_base(make_cfg, "a"), *run, "train.max_steps=4"], stop=2)
    checkpoint = _newest(saved["run_dir"])
    assert step_folders.read_meta(checkpoint).world_size == before
    resume = [f"train.resume={checkpoint}", "train.allow_resume_change=true", "train.max_steps=2"]
    loaded = _ranks(tmp_path, after, [*_base(make_cfg, "b"), *run, *resume])
    assert f"resumed from {checkpoint}" in loaded["log"]
    exported = load_file(str(Path(loaded["model_dir"]) / "unet" / "diffusion_pytorch_model.safetensors"))
    ema = _sharded_state(checkpoint, tmp_path)["ema"]
    assert all(torch.equal(exported[name], ema[name]) for name in ema)


def test_sdxl_trains_sharded_through_the_same_code(make_cfg, tmp_path):
    """The SDXL-shaped tiny model (two text encoders, size conditioning) under FSDP on two ranks: its
    export is one plain SDXL pipeline holding the gathered trained weights."""
    from diffusers import StableDiffusionXLPipeline

    run = [*RUN, "model=tiny_sdxl", "train.strategy=fsdp", "train.use_ema=false", "train.max_steps=2"]
    result = _ranks(tmp_path, 2, [*_base(make_cfg, "xl"), *run])
    assert [s for s, _ in result["losses"]] == [1, 2]
    pipe = StableDiffusionXLPipeline.from_pretrained(result["model_dir"])
    trained = _sharded_state(_newest(result["run_dir"]), tmp_path)["model"]
    exported = pipe.unet.state_dict()
    assert all(torch.equal(exported[name], trained[name]) for name in trained)
