"""Training step time: sdcluster (latent cache on) vs the floor vs the same step done the reference way.

    python -m benchmarks.train_step                        # tiny + small, 3 repeats of 10 steps each
    python -m benchmarks.train_step --models small --repeats 5

* **floor**: denoiser forward + backward (the family's own objective: noise, timesteps and target; FLUX's
  packed latents) + fused AdamW + one ``torch._foreach_lerp_`` EMA update, on precomputed latents and text
  embeddings: nothing a step cannot do without.
* **sdcluster**: :func:`sdcluster.train.loop.train` itself, timed between its optimizer steps
  (``step_events``), cache built beforehand: everything the real loop does (data loader, posterior sampling,
  grad clipping, LR scheduler, the EMA (one fused lerp, :mod:`sdcluster.train.ema`), the loss reduced for
  logging every 10 steps).
* **reference**: what diffusers' ``train_text_to_image.py`` does per step: images augmented and VAE-encoded
  every step, the text encoder every step, ``AdamW`` with torch's defaults, clipping, ``EMAModel`` with its
  default per-parameter loop, and the loss read back (``.item()``) every step.

Each (variant, repeat) runs in its own process, one after the other, variants in rotating order, so the
peak RSS is that variant's and a slow moment of a shared machine spreads over all variants. A repeat's
number is the mean of ``--steps`` steps after ``--warmup`` steps; the table shows the median and min-max
over repeats, and ``sdcluster / floor`` is taken per repeat (adjacent runs) before the median.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

VARIANTS = ("floor", "sdcluster", "reference")
REFERENCE_SIZES = ("tiny", "small")
"""The SD-1.x-shaped models, which ``train_text_to_image.py`` (the reference) trains; the flow-matching ones
(``small_flux``, ``small_sd3``) are measured against the floor only."""


def variants_of(size: str) -> tuple[str, ...]:
    return VARIANTS if size in REFERENCE_SIZES else VARIANTS[:2]


def _loader(cfg: Any, tokenizer: Any) -> Any:
    """Image batches the way the reference gets them: decoded and augmented every step."""
    import torch

    from sdcluster.data.dataset import TrainImages, collate, load_captioned_images
    from sdcluster.data.sampler import StepSampler

    train = cfg.train
    dataset = load_captioned_images(cfg.data.path)
    images = TrainImages(dataset, tokenizer, train.resolution, train.center_crop, train.random_flip)
    sampler = StepSampler(len(images), train.batch_size, 1, 0, train.seed)
    batch = train.batch_size
    return iter(torch.utils.data.DataLoader(images, batch_size=batch, sampler=sampler, collate_fn=collate))


def _floor_step(cfg: Any) -> Any:
    """One closure = one floor step, on inputs encoded once from a real batch: the model family's own
    conditioning and objective (noise, timesteps, target; FLUX's packing), so one floor serves every
    family."""
    import torch
    import torch.nn.functional as F

    from sdcluster.models.family import TIME_IDS
    from sdcluster.models.load import load_components
    from sdcluster.train.loss import scale_latents

    comps = load_components(cfg.model, cfg.cache_root)
    family = comps.family
    objective = family.objective(comps.noise_scheduler, flow=cfg.model.flow_matching)
    with torch.no_grad():
        batch = next(_loader(cfg, family.tokenizers(comps)))
        vae = comps.vae
        mean = vae.encode(batch["pixel_values"]).latent_dist.mean
        latents = scale_latents(mean, vae.config.scaling_factor, vae.config.shift_factor)
        cond = family.conditioning(family.encode(comps, batch, "cpu"), batch.get(TIME_IDS))
    denoiser = comps.denoiser.train()
    params = list(denoiser.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, fused=True)
    shadow = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        noise = torch.randn_like(latents)
        timesteps = objective.sample_timesteps(latents.shape[0], gen)
        noisy, target = objective.noised(latents, noise, timesteps)
        F.mse_loss(objective.predict(denoiser, noisy, timesteps, cond), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(shadow, params, 1 - cfg.train.ema_decay)

    return step


def _reference_step(cfg: Any) -> Any:
    """One closure = one step of ``train_text_to_image.py`` (same shapes, data and settings)."""
    import torch
    import torch.nn.functional as F
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from sdcluster.models.load import load_components

    comps = load_components(cfg.model, cfg.cache_root)
    vae, text_encoder, sched = comps.vae, comps.text_encoders["text_encoder"], comps.noise_scheduler
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet = comps.denoiser.train()
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps
    )
    lr_scheduler = get_scheduler("constant", optimizer=optimizer)
    ema = EMAModel(unet.parameters(), cfg.train.ema_decay, model_cls=type(unet), model_config=unet.config)
    batches = _loader(cfg, comps.tokenizers["tokenizer"])
    logged = [0.0]

    def step() -> None:
        batch = next(batches)
        latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],))
        hidden = text_encoder(batch["input_ids"], return_dict=False)[0]
        pred = unet(sched.add_noise(latents, noise, timesteps), timesteps, hidden, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        logged[0] += loss.detach().item()  # the script logs every step: one host sync per step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.optim.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())

    return step


def _now() -> float:
    """The time once queued GPU work is done (CUDA kernels run asynchronously)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _time_closure(step: Any, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    started = _now()
    for _ in range(steps):
        step()
    return (_now() - started) / steps


def _time_sdcluster(cfg: Any, warmup: int, steps: int) -> float:
    """Seconds per step of the real training loop, between its (warmup)-th and last optimizer step."""
    from sdcluster.runtime.step_events import stop_at
    from sdcluster.train.loop import train

    marks: list[float] = []
    last = warmup + steps

    def last_step(step: int) -> bool:
        marks.append(_now())
        return step == last  # stop like a preemption would: no export at the end

    cfg.train.max_steps = last + 1
    with stop_at(last_step):
        train(cfg)
    return (marks[last - 1] - marks[warmup - 1]) / steps


def run_one(variant: str, size: str, warmup: int, steps: int) -> dict[str, float]:
    """Measure one variant in this process (called in a child by :func:`main`)."""
    threads = common.set_threads()
    with tempfile.TemporaryDirectory() as out:
        cfg = common.seed_config(size, Path(out))
        common.reset_peak_rss()
        if variant == "sdcluster":
            seconds = _time_sdcluster(cfg, warmup, steps)
        else:
            step = _floor_step(cfg) if variant == "floor" else _reference_step(cfg)
            seconds = _time_closure(step, warmup, steps)
    return {"s_per_step": seconds, "peak_rss_mb": common.peak_rss_mb(), "threads": threads}


def _prepare(size: str) -> None:
    """Build the model and the latent cache before anything is timed (a cache build is not a step)."""
    with tempfile.TemporaryDirectory() as out:
        from sdcluster.train.loop import train

        train(common.seed_config(size, Path(out), max_steps=1))


def _table(size: str, results: dict[str, list[dict[str, float]]]) -> list[list[str]]:
    floor = [r["s_per_step"] for r in results["floor"]]
    rows = []
    for variant in variants_of(size):
        times = [r["s_per_step"] for r in results[variant]]
        ratios = [t / f for t, f in zip(times, floor, strict=True)]
        rss = [r["peak_rss_mb"] for r in results[variant]]
        rss_median = common.spread(rss, "{:.0f}")[0]
        rows.append([size, variant, *common.spread(times), *common.spread(ratios, "{:.2f}"), rss_median])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sizes = ["tiny", "small", "small_sd3", "small_flux"]
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=sizes)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.models[0], args.warmup, args.steps)))
        return
    rows, raw = [], {}
    for size in args.models:
        _prepare(size)
        extra = ["--models", size, "--warmup", str(args.warmup), "--steps", str(args.steps)]

        def child(variant: str, extra: list[str] = extra) -> dict[str, float]:
            return common.child_json(["benchmarks.train_step", "--one", variant, *extra])

        results = common.run_rotating(size, variants_of(size), args.repeats, child)
        rows += _table(size, results)
        raw[size] = results
    header = ["model", "variant", "s/step median", "min-max", "x floor median", "x floor min-max"]
    header += ["peak RSS MiB"]
    runs = f"{args.repeats} repeats x {args.steps} steps"
    title = f"Training step, batch 4, EMA, fp32 ({common.machine()}; {runs})"
    common.save("train_step", {"title": title, "args": vars(args), "results": raw})
    common.print_table(title, header, rows)


if __name__ == "__main__":
    main()
