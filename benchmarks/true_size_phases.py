"""The phases of :mod:`benchmarks.true_size`, each run in its own process: what each one measures and how.

Timings come from the job's own records: ``metrics.jsonl`` (one line per optimizer step with its time) and
sdcluster's log lines (loading done, cache built, checkpoint saved, export written), caught by a logging
handler, so the job runs exactly as it does for a user, with nothing patched.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from benchmarks import common

GIB = 1024**3


def model_folder(size: str) -> Path:
    if size == "sd1":
        from benchmarks.true_size_model import ensure_sd1_model

        return ensure_sd1_model(common.CACHE_ROOT)
    if size == "sdxl":
        from benchmarks.true_size_sdxl import ensure_sdxl_model

        return ensure_sdxl_model(common.CACHE_ROOT)
    return common.model_path(size)


class _Clock(logging.Handler):
    """Keeps (time, message) of sdcluster's log lines: when loading, saving, exporting ended."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.created, record.getMessage()))

    def at(self, prefix: str) -> float:
        return next((t for t, msg in self.lines if msg.startswith(prefix)), float("nan"))

    def seconds(self, prefix: str) -> float:
        """The number a line such as "latent cache: built in 12.3 s" reports; nan without that line."""
        line = next((msg for _, msg in self.lines if msg.startswith(prefix)), None)
        return float(line[len(prefix) :].split()[0]) if line else float("nan")


def _watch() -> _Clock:
    from sdcluster.runtime.callables import setup_logging

    setup_logging(0)
    clock = _Clock()
    logging.getLogger("sdcluster").addHandler(clock)
    return clock


def _step_times(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["time"] for r in rows if "loss" in r}


def _checkpoint_gib(run_dir: Path) -> float:
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return sum(f.stat().st_size for f in newest.rglob("*") if f.is_file()) / GIB


def phase_train(cfg: Any, stop: int) -> dict[str, Any]:
    from sdcluster.runtime.step_events import stop_at
    from sdcluster.train.loop import train

    clock, started = _watch(), time.time()
    with stop_at(lambda step: step == stop):
        result = train(cfg)
    ended = time.time()
    times = _step_times(result.run_dir)
    steps = sorted(times)
    first = times[steps[0]] - clock.at("training ")
    cache = clock.seconds("latent cache: built in ")
    return {
        "steps": steps,
        "load_s": clock.at("training ") - started,
        "first_step_s": first,  # includes building the latent cache
        "latent_cache_build_s": cache,
        "first_step_without_cache_s": first - cache,
        "step_s": [times[b] - times[a] for a, b in itertools.pairwise(steps)],
        "checkpoint_save_s": clock.at("checkpoint saved") - times[steps[-1]],
        "after_save_s": ended - clock.at("checkpoint saved"),  # the weights checksum logged at the end
        "checkpoint_gib": _checkpoint_gib(result.run_dir),
        "interrupted": result.interrupted,
    }


def phase_resume(cfg: Any) -> dict[str, Any]:
    from sdcluster.train.loop import train

    clock, started = _watch(), time.time()
    result = train(cfg)
    ended = time.time()
    times = _step_times(result.run_dir)
    resumed = clock.at("resumed from")
    loop_end = clock.at("unet weights checksum")
    saved = clock.at("checkpoint saved")
    validated = clock.at("validation step")
    return {
        "resumed": next((msg for _, msg in clock.lines if msg.startswith("resumed from")), None),
        "resume_load_s": resumed - started,
        "step_s": times[cfg.train.max_steps] - clock.at("training "),  # includes opening the latent cache
        "checkpoint_save_s": saved - loop_end,
        "final_validation_s": validated - saved,
        "export_s": clock.at("exported pipeline") - validated,
        "export_gib": sum(f.stat().st_size for f in result.model_dir.rglob("*") if f.is_file()) / GIB,
        "total_s": ended - started,
        "model_dir": str(result.model_dir),
    }


def phase_generate(cfg: Any, model_dir: str) -> dict[str, Any]:
    import dataclasses

    from sdcluster.generate.job import generate_images

    _watch()
    cfg = dataclasses.replace(cfg, task="generate")
    cfg.generate.model = model_dir
    started = time.perf_counter()
    result = generate_images(cfg)
    seconds = time.perf_counter() - started
    return {
        "images": result.generated,
        "steps": cfg.generate.steps,
        "seconds": seconds,
        "s_per_image": seconds / max(result.generated, 1),
    }


def phase_budget(size: str) -> dict[str, Any]:
    """Exact bytes of every long-lived training tensor, and one micro-step's activations measured."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sdcluster.train.ema import LerpEMA

    folder = model_folder(size)
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").train()
    unet.enable_gradient_checkpointing()
    frozen = [
        AutoencoderKL.from_pretrained(folder, subfolder="vae"),
        CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
    ]
    params = list(unet.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    ema = LerpEMA(params, decay=0.9999, foreach=True)
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    latent = unet.config.sample_size if size == "sd1" else common.RESOLUTION[size] // 8
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, latent, latent, generator=gen)
    hidden = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    timesteps = torch.tensor([500])
    before = _rss_gib()
    common.reset_peak_rss()
    F.mse_loss(unet(latents, timesteps, hidden, return_dict=False)[0], latents).backward()
    peak = common.peak_rss_mb() / 1024
    optimizer.step()
    adam = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    ema.step(params)
    parts = {
        "weights": weights / GIB,
        "gradients": weights / GIB,
        "adamw_states": adam / GIB,
        "ema": sum(s.numel() * s.element_size() for s in ema.shadow_params) / GIB,
        "frozen_vae_text": sum(p.numel() * p.element_size() for m in frozen for p in m.parameters()) / GIB,
        "activations_512px": peak - before - weights / GIB,
    }
    return {
        "parts_gib": parts,
        "sum_gib": sum(parts.values()),
        "process_rss_after_step_gib": _rss_gib(),
        "machine_ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB,
    }


def _rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")
