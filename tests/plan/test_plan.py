"""The memory plan: exact parameter counts, bytes per part by formula, the refusal before the queue with a
change that was planned to fit, the dry run and ``python -m sdcluster.plan``."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdcluster.config import ConfigError
from sdcluster.plan.activations import activation_bytes
from sdcluster.plan.budget import FP32, GIB, HALF
from sdcluster.plan.fit import check_fits, plan_config
from tests.conftest import REPO

MIB = 1024**2


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_are_the_loaded_models_and_the_methods_adapters(
    make_cfg, tiny_model: Path, fresh_accelerate_state
) -> None:
    """Counted on the meta device from the configs alone, equal to the loaded components, and the adapters
    equal to what the LoRA method trains (denoiser and text encoder)."""
    from accelerate import Accelerator

    from sdcluster.models.load import load_components
    from sdcluster.train.method import make_method

    cfg = make_cfg(["train.method=lora", "train.lora.rank=8", "train.lora.text_encoder_lr=1e-4"])
    sizes = plan_config(cfg).sizes
    comps = load_components(cfg.model, cfg.cache_root)
    assert sizes.denoiser == _params(comps.denoiser)
    encoder = comps.text_encoders["text_encoder"]
    assert sizes.frozen == {"vae": _params(comps.vae), "text_encoder": _params(encoder)}
    method = make_method(cfg, comps.family)
    method.prepare(comps, Accelerator(cpu=True))
    trained = dict(method.named_parameters())
    in_encoder = sum(p.numel() for n, p in trained.items() if n.startswith("text_encoder."))
    assert sizes.encoder_adapters == in_encoder > 0
    assert sizes.denoiser_adapters == sum(p.numel() for p in trained.values()) - in_encoder > 0


def test_bytes_per_part_follow_the_formula(make_cfg) -> None:
    full = plan_config(make_cfg(["train.use_ema=true", "data.cache=false"]))
    d, frozen = full.sizes.denoiser, sum(full.sizes.frozen.values())
    acts = activation_bytes("sd1", d, full.sizes.denoiser_width, 64, 2, False).bytes
    adamw = 2 * FP32 * d + 4 * len(full.sizes.denoiser_shapes)  # two float32 moments, a step per tensor
    assert full.plan.parts == {
        "weights": FP32 * d,
        "gradients": FP32 * d,
        "optimizer state": adamw,
        "EMA": FP32 * d,
        "frozen parts": FP32 * frozen,
        "activations": acts,
    }
    assert full.plan.total == full.plan.peak == 3 * FP32 * d + adamw + FP32 * frozen + acts
    assert full.plan.before_steps == 0  # every step runs the text encoder: held throughout, in the parts

    # cached: the steps hold the VAE alone; a cache build in the job holds the weights and every frozen part
    cached = full.again(make_cfg(["train.use_ema=true"]))
    vae = FP32 * full.sizes.frozen["vae"]
    assert cached.parts["frozen parts"] == vae < FP32 * frozen
    assert cached.total == full.plan.total - FP32 * (frozen - full.sizes.frozen["vae"])
    assert cached.before_steps == FP32 * d + FP32 * frozen and cached.peak == cached.total
    in_array = full.again(make_cfg(["train.use_ema=true", "data.cache_shards=4"]))
    assert in_array.before_steps == 0 and in_array.total == cached.total  # the array job builds it
    trained = full.again(
        make_cfg(["train.method=lora", "train.lora.text_encoder_lr=1e-4", "train.use_ema=true"])
    )
    assert trained.before_steps == 0 and trained.parts["frozen parts"] > FP32 * frozen  # held, adapted

    # four processes sharding it: a quarter of each trained part, plus two gathered blocks; the EMA offloaded
    sharded = full.again(
        make_cfg(
            [
                "train.use_ema=true",
                "train.ema_offload=true",
                "train.strategy=fsdp",
                "cluster.tasks_per_node=4",
            ]
        )
    )
    block = 2 * FP32 * full.sizes.largest_block
    assert sharded.parts["weights"] == FP32 * d // 4 + block
    assert sharded.parts["gradients"] == FP32 * d // 4
    assert sharded.parts["optimizer state"] == adamw // 4
    assert sharded.parts["EMA"] == 0
    # DDP on two processes: a whole copy each, and the gradients once more in DDP's buckets
    replicated = full.again(make_cfg(["train.use_ema=true", "cluster.tasks_per_node=2"]))
    assert replicated.parts["gradients"] == 2 * FP32 * d
    assert replicated.parts["weights"] == full.plan.parts["weights"]

    # LoRA in bf16: the frozen base and encoders in half precision, the adapters and their state in float32
    lora = plan_config(
        make_cfg(["train.method=lora", "train.mixed_precision=bf16", "optim=adamw8bit", "data.cache=false"])
    )
    a = lora.sizes.denoiser_adapters
    assert a == sum(math.prod(s) for s in lora.sizes.adapter_shapes)
    assert lora.plan.parts["weights"] == HALF * d + FP32 * a
    assert lora.plan.parts["gradients"] == FP32 * a
    eight_bit = sum(lora.cfg.optim.state_bytes(s, FP32) for s in lora.sizes.adapter_shapes)
    assert lora.plan.parts["optimizer state"] == eight_bit
    assert lora.plan.parts["frozen parts"] == HALF * frozen


def test_the_optimizer_state_is_what_adamw_keeps_after_a_step(make_cfg, tiny_model: Path) -> None:
    """The plan's AdamW state, from the schema's count by shape, is the bytes of the real optimizer's state
    for the tiny UNet after one step."""
    import torch
    from diffusers import UNet2DConditionModel

    planned = plan_config(make_cfg())
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    optimizer = torch.optim.AdamW(unet.parameters(), fused=True)
    for p in unet.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    assert planned.plan.parts["optimizer state"] == state


def test_activations_are_measured_and_scaled_by_the_stated_rule(make_cfg) -> None:
    sizes = plan_config(make_cfg()).sizes
    one = activation_bytes("sd1", sizes.denoiser, sizes.denoiser_width, 64, 1, False)
    two = activation_bytes("sd1", sizes.denoiser, sizes.denoiser_width, 64, 2, False)
    four = activation_bytes("sd1", sizes.denoiser, sizes.denoiser_width, 64, 4, False)
    assert one.basis == "measured" and 0 < one.bytes < two.bytes
    assert four.bytes - two.bytes == 2 * (two.bytes - one.bytes)  # linear in the micro-batch
    checkpointed = activation_bytes("sd1", sizes.denoiser, sizes.denoiser_width, 128, 2, True)
    plain = activation_bytes("sd1", sizes.denoiser, sizes.denoiser_width, 128, 2, False)
    assert checkpointed.bytes < plain.bytes
    bigger = activation_bytes("sd1", sizes.denoiser, sizes.denoiser_width, 256, 2, False)
    assert "scaled from 128 px" in bigger.basis and bigger.bytes > plain.bytes


def test_a_lora_step_is_planned_at_the_forward_s_end_and_a_full_one_late_in_the_backward(make_cfg) -> None:
    """LoRA's gradients are small, so its step peaks when the forward has saved everything: the plan adds
    what the forward leaves alive, not the backward pass's excess over gradients it does not have; with
    accumulation the earlier micro-steps' gradients are alive then too. A full fine-tune's gradients are as
    large as its weights, and its plan keeps the backward pass's excess."""
    full = plan_config(make_cfg())
    sizes = full.sizes
    measured = activation_bytes("sd1", sizes.denoiser, sizes.denoiser_width, 64, 2, False)
    assert measured.forward is not None and measured.forward > measured.bytes
    assert full.plan.parts["activations"] == measured.bytes

    lora = plan_config(make_cfg(["train.method=lora"]))
    grads = lora.plan.parts["gradients"]
    assert lora.plan.parts["activations"] == measured.forward - grads
    assert lora.plan.activations.basis.startswith("at the forward's end")
    accumulating = lora.again(make_cfg(["train.method=lora", "train.grad_accum=2"]))
    assert accumulating.parts["activations"] == measured.forward


def _fix(err: ConfigError) -> list[str]:
    """The overrides the refusal proposes (what follows ``Fix:``, before the planned size)."""
    fix = str(err).split("Fix: ", 1)[1]
    return [w for w in fix.split(" (planned")[0].split() if "=" in w]


@pytest.mark.parametrize(
    ("overrides", "cheapest"),
    [
        (["train.use_ema=true"], ["train.ema_offload=true"]),
        (
            ["cluster.gpus_per_node=1", "optim=prodigy", "train.gradient_checkpointing=true"],
            ["train.strategy=fsdp", "train.fsdp_offload=true"],
        ),
    ],
)
def test_a_plan_above_the_gpu_is_refused_with_the_cheapest_change_planned_to_fit(
    make_cfg, overrides, cheapest
) -> None:
    """The budget is what the cheapest change needs: nothing cheaper fits it (gradient checkpointing saves
    little at 64 px, and a leaner optimizer keeps the weights and gradients whole), and the suggestion, typed
    as it is printed, passes the check (prodigy: adafactor and adamw8bit cannot step FSDP's shards)."""
    needs = plan_config(make_cfg([*overrides, *cheapest])).plan.total
    budget = f"cluster.gpu_mem_gb={(needs + 1) / GIB:.9f}"
    with pytest.raises(ConfigError) as err:
        check_fits(make_cfg([*overrides, budget]))
    message = str(err.value)
    for part in ("weights", "gradients", "optimizer state", "EMA", "frozen parts", "activations", "total"):
        assert re.search(rf"^  {part} +\d", message, re.M), (part, message)
    assert "does NOT fit" in message
    assert _fix(err.value) == cheapest, message
    assert check_fits(make_cfg([*overrides, budget, *cheapest])) == []


def test_no_budget_plans_nothing_and_a_bad_budget_is_refused(make_cfg) -> None:
    assert check_fits(make_cfg()) == []
    with pytest.raises(ConfigError, match=r"cluster\.gpu_mem_gb: got -1\.0"):
        make_cfg(["cluster.gpu_mem_gb=-1"])


def _run(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    roots = [f"output_root={tmp / 'outputs'}", f"jobs_root={tmp / 'jobs'}", f"cache_root={tmp / 'cache'}"]
    env = {**os.environ, "PATH": str(tmp / "no-slurm-here"), "SDCLUSTER_HOME": str(tmp / "home")}
    return subprocess.run(
        [sys.executable, "-m", *args, *roots], capture_output=True, text=True, cwd=REPO, timeout=600, env=env
    )


def test_a_gpu_job_s_dry_run_prints_its_plan_and_a_launch_above_the_gpu_queues_nothing(tmp_path) -> None:
    gpu = ["+cluster=slurm", "cluster.gpus_per_node=2", "task=train"]
    proc = _run(["sdcluster.launch", *gpu, "launch.dry_run=true", "cluster.gpu_mem_gb=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "memory plan per GPU: tiny, train.method=full, train.strategy=ddp on 2 process(es)" in proc.stdout
    assert re.search(r"^  total +[\d.]+ MiB per GPU$", proc.stdout, re.M), proc.stdout[-2000:]
    assert re.search(r"^  cluster.gpu_mem_gb +1024.00 MiB: fits$", proc.stdout, re.M)

    proc = _run(["sdcluster.launch", *gpu, "cluster.gpu_mem_gb=0.001"], tmp_path)
    assert proc.returncode != 0
    assert "cluster.gpu_mem_gb: the training job needs" in proc.stderr and "Fix: " in proc.stderr
    assert not (tmp_path / "jobs").exists(), "refused before anything was submitted"


def test_the_plan_command_prints_the_table_and_says_when_it_does_not_fit(tmp_path) -> None:
    proc = _run(["sdcluster.plan", "train.method=lora", "cluster.gpu_mem_gb=0.001"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "memory plan per GPU: tiny, train.method=lora" in proc.stdout
    assert re.search(r"^  optimizer state +[\d.]+ MiB$", proc.stdout, re.M)
    assert "does not fit: cluster.gpu_mem_gb" in proc.stderr and "Fix: " in proc.stderr
