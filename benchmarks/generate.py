"""Generation throughput: the seed's batch-1 loop vs sdcluster's batched generation, images/s and peak RSS.

    python -m benchmarks.generate          # tiny + small, 3 repeats, 2 prompts x 8 images, batch 8 and 16
    python -m benchmarks.generate --models small --repeats 5 --batch-sizes 4 8 16

Same model, prompts, seeds, 20 steps, guidance 7.5 and scheduler (PNDM, the models' own) for every variant:

* **batch-1 loop**: what the seed's ``inference.py`` does: one ``pipe(prompt, generator=...)`` call per
  image, each image saved as PNG.
* **sdcluster, batch B**: :func:`sdcluster.generate.job.generate_images` itself: one pipeline call per batch
  of B, text embeddings once per prompt, sliced VAE decode, PNG + manifest record per image, contact sheet.

Each (variant, repeat) runs in a fresh process, variants in rotating order; the clock starts after the
imports (start-up is :mod:`benchmarks.startup`'s business) and covers loading the pipeline and writing every
image, so ``images/s`` = images / that time.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

PROMPTS = [
    "A single pair of denim jeans laid flat on a white background, viewed from the front.",
    "A pair of faded denim jeans laid flat on a white background with a small black square marker.",
]
PER_PROMPT = 8
STEPS = 20
GUIDANCE = 7.5


def _config(size: str, out: Path, batch_size: int) -> Any:
    from sdcluster.config import Config, GenerateConfig

    res = common.RESOLUTION[size]
    gen = GenerateConfig(
        prompts=list(PROMPTS),
        num_images=PER_PROMPT,
        batch_size=batch_size,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        height=res,
        width=res,
        scheduler="pndm",
        model=str(common.model_path(size)),
    )
    return Config(task="generate", output_root=str(out), jobs_root=str(out / "jobs"), generate=gen)


def _batch1_loop(size: str, out: Path) -> int:
    """The seed's loop: a pipeline call and a PNG per image."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        common.model_path(size), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    res = common.RESOLUTION[size]
    count = 0
    for p, prompt in enumerate(PROMPTS):
        for i in range(PER_PROMPT):
            generator = torch.Generator("cpu").manual_seed(1000 * p + i)
            image = pipe(
                prompt,
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                generator=generator,
                height=res,
                width=res,
            ).images[0]
            image.save(out / f"p{p}_{i}.png")
            count += 1
    return count


def run_one(variant: str, size: str) -> dict[str, float]:
    """Measure one variant in this process (called in a child by :func:`main`)."""
    common.set_threads()
    # Imports before the clock: they are start-up (benchmarks.startup), the same for every variant.
    from diffusers import StableDiffusionPipeline  # noqa: F401

    import sdcluster.generate.job  # noqa: F401

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        common.reset_peak_rss()
        started = time.perf_counter()
        if variant == "batch-1 loop":
            images = _batch1_loop(size, out)
        else:
            from sdcluster.generate.job import generate_images

            images = generate_images(_config(size, out, int(variant.rsplit(" ", 1)[1]))).generated
        seconds = time.perf_counter() - started
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "peak_rss_mb": common.peak_rss_mb(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.models[0])))
        return
    variants = ["batch-1 loop", *(f"sdcluster batch {b}" for b in args.batch_sizes)]
    rows, raw = [], {}
    for size in args.models:
        common.model_path(size)  # build the model outside the timing

        def child(variant: str, size: str = size) -> dict[str, float]:
            return common.child_json(["benchmarks.generate", "--one", variant, "--models", size])

        results = common.run_rotating(size, variants, args.repeats, child)
        loop = [r["images_per_s"] for r in results["batch-1 loop"]]
        for variant in variants:
            rates = [r["images_per_s"] for r in results[variant]]
            speedups = [rate / base for rate, base in zip(rates, loop, strict=True)]
            rss = common.spread([r["peak_rss_mb"] for r in results[variant]], "{:.0f}")[0]
            rows.append([size, variant, *common.spread(rates), *common.spread(speedups, "{:.2f}"), rss])
        raw[size] = results
    header = [
        "model",
        "variant",
        "images/s median",
        "min-max",
        "x loop median",
        "x loop min-max",
        "peak RSS MiB",
    ]
    shape = f"{len(PROMPTS)} prompts x {PER_PROMPT} images, {STEPS} steps, guidance {GUIDANCE}, PNDM, fp32"
    title = f"Generation, {shape} ({common.machine()}; {args.repeats} repeats)"
    common.save("generate", {"title": title, "args": vars(args), "results": raw})
    common.print_table(title, header, rows)


if __name__ == "__main__":
    main()
