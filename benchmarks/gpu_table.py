"""The GPU table: SD 1.x at true size, the seed's recipe in fp16 and bf16, then 512 px generation.

    bash benchmarks/gpu_wheels.sh install wheels && python -m benchmarks.gpu_table     # on the GPU (~8 min)
    python -m benchmarks.gpu_table --dry-run        # the same path on CPU, small model, a few steps (~3 min)

Made for a GPU machine without internet (an H200 with torch, accelerate, transformers and peft installed): the
rest comes as wheels from ``benchmarks/gpu_wheels.sh``. The model is the random-weight SD 1.x of
:mod:`benchmarks.true_size_model` (built there in about a minute); everything else is sdcluster's own path.
Each row runs in a fresh process.

* **training**: ``experiment=jeans_sd14`` (512 px, batch 1 x accumulation 4, gradient checkpointing, EMA,
  latent cache) through :func:`sdcluster.train.loop.train` with ``train.mixed_precision`` fp16, bf16, and bf16
  with ``train.ema_offload=true``; ``--warmup`` steps, then ``--steps`` timed ones (the gaps between
  ``metrics.jsonl`` lines; the run then stops with a checkpoint, as if preempted). Peak GPU memory is
  ``torch.cuda.max_memory_allocated``; beside it the memory plan's prediction for the same config (what
  the launch compares with ``cluster.gpu_mem_gb``) and its error. Model FLOP utilisation (MFU): the FLOPs
  of one optimizer step counted by ``torch.utils.flop_counter.FlopCounterMode`` on a real forward +
  backward (without the recomputation of gradient checkpointing: that is hardware work, not model work; it
  is reported too), divided by the seconds per step and ``--peak-tflops`` (H200: 989 dense bf16).
  ``--variants "bf16 batch 8 x 1" --merge`` adds rows to the saved table: one micro-step of 8 images per
  optimizer step (twice the seed's 4; FLOPs scaled per image), with gradient checkpointing and without.
* **generation**: 2 prompts x 8 images, 50 steps (the seed's), fp16: the seed's batch-1 loop (one pipeline
  call and one PNG per image, as :mod:`benchmarks.generate`'s reference) against sdcluster's generation job in
  batches of 8. Both load the pipeline inside the clock, after one untimed warm-up image.

Writes ``benchmarks/results/gpu_table.json`` and ``gpu_table.md`` (``--dry-run``: ``gpu_table_dryrun.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.true_size import PROMPT, compose
from benchmarks.true_size_phases import model_folder

PROMPTS = [
    PROMPT,
    "A pair of faded denim jeans laid flat on a white background with a small black square marker.",
]
TRAIN_VARIANTS = {
    "fp16": ("fp16", []),
    "bf16": ("bf16", []),
    "bf16 + ema_offload": ("bf16", ["train.ema_offload=true"]),
    # The same work per image as batch 1 x 4, in one micro-step of 8 images: what batch 1 loses to kernel
    # launches (one 512 px SD 1.x image is too small a micro-step to fill an H200).
    "bf16 batch 8 x 1": ("bf16", ["train.batch_size=8", "train.grad_accum=1"]),
    "bf16 batch 8 x 1 no checkpointing": (
        "bf16",
        ["train.batch_size=8", "train.grad_accum=1", "train.gradient_checkpointing=false"],
    ),
}
BASE_VARIANTS = ["fp16", "bf16", "bf16 + ema_offload"]
# SDXL base at 1024 px, the seed's batch 1 x 4 with EMA (full) in bf16: DDP (every rank holds everything) and
# FSDP on one GPU (nothing to shard across, so what FSDP itself adds: its gathered blocks and bookkeeping),
# and diffusers' LoRA recipe (rank 4, no EMA).
SDXL_VARIANTS = {
    "sdxl lora": ("bf16", ["train.method=lora", "train.lora.rank=4", "train.use_ema=false"]),
    "sdxl full, ddp": ("bf16", []),
    "sdxl full, fsdp": ("bf16", ["train.strategy=fsdp"]),
}


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peak_memory_gib() -> float:
    """Peak GPU memory of this process (allocated by torch); on CPU the peak resident memory instead."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1024**3
    return common.peak_rss_mb() / 1024


def run_train(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.true_size_phases import _step_times
    from sdcluster.plan.fit import plan_config
    from sdcluster.runtime.step_events import observing, stop_at
    from sdcluster.train.loop import train

    sdxl = variant in SDXL_VARIANTS
    precision, extra = SDXL_VARIANTS[variant] if sdxl else TRAIN_VARIANTS[variant]
    if args.dry_run:
        precision = (
            "bf16"  # fp16 needs a GPU; bf16 autocast runs (slowly) on CPU: the path is what is checked
        )
    out = Path(args.workdir) / variant.replace(" ", "").replace("+", "-").replace(",", "-")
    total = args.warmup + args.steps
    cfg = compose(args.model, out, total, 2, precision, extra)
    planned = plan_config(cfg)  # the launch's prediction for this very config, made before the run

    def row(gaps: list[float]) -> dict[str, Any]:
        return {
            "precision": precision,
            "s_per_step": statistics.median(gaps),
            "gaps": gaps,
            "peak_gib": _peak_memory_gib(),
            "images_per_step": cfg.train.batch_size * cfg.train.grad_accum,
            "checkpointing": cfg.train.gradient_checkpointing,
            "overrides": [f"train.mixed_precision={precision}", *extra],
            "plan_gib": planned.plan.total / 1024**3 if planned else None,
            "plan_parts_gib": {k: v / 1024**3 for k, v in planned.plan.parts.items()} if planned else None,
            # whether the steps ran with the text encoders loaded (what the plan of this row counts)
            "text_encoders_held": not planned.plan.setup.text_cached if planned else None,
        }

    if sdxl:
        # A full SDXL checkpoint is 40 GiB (weights, AdamW, EMA): its write is not what is measured, so the
        # row is printed at the last step and the process ends there, before the preemption's save.
        # Two peaks: up to the first step's end (loading, the latent cache's build, one step) and over the
        # steps after it (what the plan predicts).
        stamps: dict[int, float] = {}
        peaks: dict[str, float] = {}

        def last_step(unit: str, count: int, flag: object) -> None:
            if unit != "step":
                return
            _synchronize()
            stamps[count] = time.perf_counter()
            if count == 1:
                peaks["start_peak_gib"] = _peak_memory_gib()
                _reset_peak()
            if count == total:
                peaks["steps_peak_gib"] = _peak_memory_gib()
                gaps = [stamps[s] - stamps[s - 1] for s in range(args.warmup + 1, total + 1)]
                print(json.dumps({**row(gaps), **peaks}))
                sys.stdout.flush()
                os._exit(0)

        with observing(last_step):
            train(cfg)
        raise RuntimeError(f"training ended before step {total}")
    with stop_at(lambda step: step == total):
        result = train(cfg)
    times = _step_times(result.run_dir)
    shutil.rmtree(out, ignore_errors=True)  # a checkpoint of SD 1.x is 13 GiB
    return row([times[s] - times[s - 1] for s in range(args.warmup + 1, total + 1)])


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_flops(args: argparse.Namespace) -> dict[str, Any]:
    """FLOPs of one optimizer step (grad_accum micro-steps), counted on a real forward + backward."""
    import torch
    import torch.nn.functional as F
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    device = _device()
    cfg = compose(args.model, Path(args.workdir), 2, 2)
    unet = UNet2DConditionModel.from_pretrained(model_folder(args.model), subfolder="unet").to(device).train()
    side = cfg.train.resolution // 8
    latents = torch.randn(cfg.train.batch_size, 4, side, side, device=device)
    hidden = torch.randn(cfg.train.batch_size, 77, unet.config.cross_attention_dim, device=device)
    timesteps = torch.full((cfg.train.batch_size,), 500, device=device)

    def micro_step_flops() -> int:
        with FlopCounterMode(display=False) as counter, torch.autocast(device.type, dtype=torch.bfloat16):
            F.mse_loss(unet(latents, timesteps, hidden, return_dict=False)[0].float(), latents).backward()
        unet.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    model = micro_step_flops()
    unet.enable_gradient_checkpointing()
    hardware = micro_step_flops()
    return {
        "model_flops_per_step": model * cfg.train.grad_accum,
        "hw_flops_per_step": hardware * cfg.train.grad_accum,
    }


def run_generate(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    import torch

    out = Path(args.workdir) / "images"
    shutil.rmtree(out, ignore_errors=True)
    cfg = compose(args.model, out, 2, args.gen_steps, "no" if args.dry_run else "fp16")
    gen = dataclasses.replace(
        cfg.generate, prompts=PROMPTS[: args.prompts], num_images=args.per_prompt, batch_size=args.batch
    )
    cfg = dataclasses.replace(
        cfg, task="generate", generate=dataclasses.replace(gen, model=str(model_folder(args.model)))
    )
    count = len(gen.prompts) * gen.num_images
    if variant == "batch-1 loop":
        _batch1_loop(cfg, out / "warm", 1)
        started = time.perf_counter()
        _batch1_loop(cfg, out / "timed", count)
    else:
        from sdcluster.generate.job import generate_images

        warm = dataclasses.replace(cfg, output_root=str(out / "warm"))
        generate_images(
            dataclasses.replace(
                warm,
                generate=dataclasses.replace(
                    gen, num_images=1, batch_size=1, prompts=gen.prompts[:1], model=cfg.generate.model
                ),
            )
        )
        started = time.perf_counter()
        count = generate_images(dataclasses.replace(cfg, output_root=str(out / "timed"))).generated
    if torch.cuda.is_available():  # the images are on disk already; this only makes the clock exact
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {
        "images": count,
        "seconds": seconds,
        "images_per_s": count / seconds,
        "peak_gib": _peak_memory_gib(),
    }


def _batch1_loop(cfg: Any, out: Path, count: int) -> None:
    """The seed's inference.py: one pipeline call and one PNG per image."""
    import torch
    from diffusers import StableDiffusionPipeline

    device = _device()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        cfg.generate.model, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    ).to(device)
    pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True, exist_ok=True)
    g = cfg.generate
    for k in range(count):
        p, i = divmod(k, g.num_images)
        generator = torch.Generator(device.type).manual_seed(1000 * p + i)
        image = pipe(
            g.prompts[p],
            num_inference_steps=g.steps,
            guidance_scale=g.guidance_scale,
            generator=generator,
            height=g.height,
            width=g.width,
        ).images[0]
        image.save(out / f"p{p}_{i}.png")


def _child(kind: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """One row in a fresh process (its peak memory is its own); a failure is recorded, the rest still runs."""
    argv = [
        sys.executable,
        "-m",
        "benchmarks.gpu_table",
        "--one",
        kind,
        "--variant",
        variant,
        *args.passthrough,
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else None
    result = common.child_streamed(argv, env)
    print(f"{kind} {variant}: {result}", file=sys.stderr, flush=True)
    return result


def _rows(record: dict[str, Any], peak_tflops: float) -> tuple[list[list[str]], list[list[str]]]:
    flops = record["flops"]
    train_rows = []
    for variant, r in record["train"].items():
        if "failed" in r:
            train_rows.append([variant, "failed", "", "", "", "", ""])
            continue
        planned = r.get("plan_gib")
        error = f"{planned:.1f} ({100 * (planned - r['peak_gib']) / r['peak_gib']:+.0f}%)" if planned else ""
        # FLOPs were counted for the seed's 1 x 4 step: scaled per image to the variant's step
        images = r.get("images_per_step", 4) / 4
        model = images * flops.get("model_flops_per_step", float("nan")) / r["s_per_step"]
        hardware = images * flops.get("hw_flops_per_step", float("nan")) / r["s_per_step"]
        hardware = hardware if r.get("checkpointing", True) else model  # nothing recomputed
        train_rows.append(
            [
                variant,
                f"{r['s_per_step']:.3f}",
                f"{r['peak_gib']:.1f}",
                error,
                f"{model / 1e12:.3g}",
                f"{100 * model / (peak_tflops * 1e12):.3g}%",
                f"{100 * hardware / (peak_tflops * 1e12):.3g}%",
            ]
        )
    loop = record["generate"].get("batch-1 loop", {}).get("images_per_s")
    gen_rows = []
    for variant, r in record["generate"].items():
        if "failed" in r:
            gen_rows.append([variant, "failed", "", ""])
            continue
        speedup = f"{r['images_per_s'] / loop:.2f}" if loop else ""
        gen_rows.append([variant, f"{r['images_per_s']:.3f}", speedup, f"{r['peak_gib']:.1f}"])
    return train_rows, gen_rows


def _plan_error(r: dict[str, Any], measured: float) -> str:
    planned = r.get("plan_gib")
    return f"{planned:.1f} ({100 * (planned - measured) / measured:+.0f}%)" if planned else ""


def _sdxl_rows(rows: dict[str, dict[str, Any]]) -> list[list[str]]:
    table = []
    for variant, r in rows.items():
        if "failed" in r:
            table.append([variant, "failed", "", "", "", ""])
            continue
        images = r["images_per_step"] / r["s_per_step"]
        steps, start = r.get("steps_peak_gib", r["peak_gib"]), r.get("start_peak_gib")
        start_text = f"{start:.1f}" if start is not None else ""
        table.append(
            [
                variant,
                f"{r['s_per_step']:.3f}",
                f"{images:.2f}",
                f"{steps:.1f}",
                _plan_error(r, steps),
                start_text,
            ]
        )
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, small model, 2+1 steps, 2 images")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--model", choices=["sd1", "small", "tiny", "sdxl", "small_sdxl"], default="sd1")
    parser.add_argument(
        "--sdxl", action="store_true", help="the SDXL rows only, added to the saved table (true-size SDXL)"
    )
    parser.add_argument("--warmup", type=int, default=5, help="optimizer steps not timed")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps timed")
    parser.add_argument("--gen-steps", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=2, choices=[1, 2])
    parser.add_argument("--per-prompt", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="sdcluster's generation batch")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H200: 989)")
    parser.add_argument("--workdir", default=str(common.CACHE_ROOT / "gpu-table-run"))
    parser.add_argument("--variants", nargs="+", choices=list(TRAIN_VARIANTS), default=BASE_VARIANTS)
    parser.add_argument(
        "--merge", action="store_true", help="add these training rows to the saved table (no generation)"
    )
    parser.add_argument(
        "--replan", action="store_true", help="only the plan column of the saved table again (no GPU needed)"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sdxl:
        args.model = "small_sdxl" if args.dry_run else "sdxl"
    if args.dry_run:
        args.device, args.model, args.warmup, args.steps = "cpu", args.model.replace("sd1", "small"), 1, 1
        args.gen_steps, args.prompts, args.per_prompt, args.batch = 2, 1, 2, 2
    if args.one:
        common.set_threads()
        runners = {"train": lambda: run_train(args.variant, args), "flops": lambda: run_flops(args)}
        runners["generate"] = lambda: run_generate(args.variant, args)
        print(json.dumps(runners[args.one]()))
        return
    if args.replan:
        record = json.loads((Path(__file__).resolve().parent / "results" / "gpu_table.json").read_text())
        replan(record, Path(args.workdir))
        args.device, args.model = "cuda", "sdxl"  # the saved run's labels
        _write("gpu_table", record, args)
        return
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("no GPU visible: use --dry-run (or --device cpu) to check the path on CPU")
    args.passthrough = ["--device", args.device, "--model", args.model, "--warmup", str(args.warmup)]
    args.passthrough += ["--steps", str(args.steps), "--gen-steps", str(args.gen_steps)]
    args.passthrough += ["--prompts", str(args.prompts), "--per-prompt", str(args.per_prompt)]
    args.passthrough += ["--batch", str(args.batch), "--workdir", args.workdir]
    args.passthrough += ["--dry-run"] if args.dry_run else []
    model_folder(args.model)  # built once, outside every measurement
    name = "gpu_table" if args.device == "cuda" else "gpu_table_dryrun"  # a CPU check is not the GPU table
    saved = Path(__file__).resolve().parent / "results" / f"{name}.json"
    if args.sdxl:  # beside the SD 1.x rows as the saved run measured them
        record = json.loads(saved.read_text())
        record["sdxl_machine"] = common.machine()
        record["sdxl_args"] = {"warmup": args.warmup, "steps": args.steps}
        record["sdxl"] = {v: _child("train", v, args) for v in SDXL_VARIANTS}
        _write(name, record, args)
        return
    if args.merge:  # the FLOPs, the generation rows and the other variants as the saved run measured them
        record = json.loads(saved.read_text())
    else:
        record = {"machine": common.machine(), "args": {k: v for k, v in vars(args).items()}}
        record["flops"] = _child("flops", "-", args)
        record["train"] = {}
    variants = ["bf16"] if args.dry_run else args.variants
    record["train"].update({v: _child("train", v, args) for v in variants})
    if not args.merge:
        record["generate"] = {
            v: _child("generate", v, args) for v in ("batch-1 loop", f"sdcluster batch {args.batch}")
        }
    _write(name, record, args)


def replan(record: dict[str, Any], workdir: Path) -> None:
    """The plan column of every saved row again, from the activation table sdcluster ships now: each row's
    config composed as it ran, on a folder of its model's published configs (all a plan reads)."""
    from benchmarks.published_configs import write_config_folder
    from sdcluster.plan.budget import plan
    from sdcluster.plan.fit import plan_config, setup_of

    for size, published, rows, variants in (
        ("sd1", "sd15", record["train"], TRAIN_VARIANTS),
        ("sdxl", "sdxl", record.get("sdxl", {}), SDXL_VARIANTS),
    ):
        folder = write_config_folder(published, workdir / published)
        for variant, r in rows.items():
            if "failed" in r:
                continue
            cfg = compose(size, workdir, 2, 2, r["precision"], variants[variant][1], model_path=folder)
            planned = plan_config(cfg)
            # A row measured while cached runs still held their text encoders (every row before the
            # field existed) is planned as it ran: with them.
            setup = setup_of(cfg, planned.sizes).but(text_cached=not r.get("text_encoders_held", True))
            again = plan(setup)
            r["plan_gib"] = again.total / 1024**3
            r["plan_parts_gib"] = {k: v / 1024**3 for k, v in again.parts.items()}


def _write(name: str, record: dict[str, Any], args: argparse.Namespace) -> None:
    """Print the tables of ``record`` and save it (JSON and Markdown) as ``name``."""
    shutil.rmtree(args.workdir, ignore_errors=True)
    saved = record["args"]
    train_rows, gen_rows = _rows(record, args.peak_tflops)
    shape = "512 px" if saved["model"] == "sd1" else f"{saved['model']} model"
    timed = f"{saved['steps']} steps after {saved['warmup']} warm-up"
    memory = "GPU" if args.device == "cuda" else "RSS"  # max_memory_allocated, or on CPU the process's peak
    text = common.print_table(
        f"Training, the seed's recipe ({shape}, batch 1 x 4, EMA), {timed} ({record['machine']})",
        ["variant", "s/step", f"peak {memory} GiB", "plan GiB", "model TFLOP/s", "MFU", "with recompute"],
        train_rows,
    )
    images = f"{saved['prompts']} prompts x {saved['per_prompt']} images, {saved['gen_steps']} steps"
    text += "\n" + common.print_table(
        f"Generation, {images}", ["variant", "images/s", "x loop", f"peak {memory} GiB"], gen_rows
    )
    if "sdxl" in record:
        shape = "1024 px" if args.model == "sdxl" else f"{args.model} model"
        steps = f"{record['sdxl_args']['steps']} steps after {record['sdxl_args']['warmup']} warm-up"
        text += "\n" + common.print_table(
            f"Training SDXL ({shape}, batch 1 x 4, bf16, gradient checkpointing), {steps} "
            f"({record['sdxl_machine']})",
            ["variant", "s/step", "images/s", f"peak {memory} GiB", "plan GiB", "until step 1 GiB"],
            _sdxl_rows(record["sdxl"]),
        )
    record["table"] = text
    common.save(name, record)
    (Path(__file__).resolve().parent / "results" / f"{name}.md").write_text(text)


if __name__ == "__main__":
    main()
