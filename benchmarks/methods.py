"""Full fine-tuning against LoRA on SD-1.x-, SDXL-, SD-3.5- and FLUX-shaped models: step, memory, checkpoint.

    python -m benchmarks.methods                               # small + small_sdxl, 3 repeats of 10 steps
    python -m benchmarks.methods --models small_sd3 small_flux --repeats 3

Every row is :func:`sdcluster.train.loop.train` itself with the seed's settings (batch 4, EMA, lr 1e-5
constant, clipping at 1, latent cache on, built beforehand), only ``train.method`` differing: ``full`` trains
the whole denoiser (UNet or transformer), ``lora`` rank-8 adapters on its attention projections
(``to_q``/``to_k``/``to_v``/``to_out.0``, as diffusers' LoRA examples of every family). Each (model, method,
repeat) runs in its own process, methods in rotating order. A repeat reports the mean time between its
optimizer steps after ``--warmup`` steps, the process's peak RSS, the trainable parameters, and the size of
the checkpoint it then writes (weights or adapters, optimizer moments, EMA, RNG and loader state: what a
preemption leaves on disk).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.train_step import _now, _prepare

METHODS = ("full", "lora")


def run_one(method: str, size: str, warmup: int, steps: int) -> dict[str, float]:
    """Measure one method in this process (called in a child by :func:`main`)."""
    from sdcluster.config.train import LoraConfig
    from sdcluster.runtime.step_events import stop_at
    from sdcluster.train import step_folders
    from sdcluster.train.loop import train

    threads = common.set_threads()
    with tempfile.TemporaryDirectory() as out:
        lora = {"lora": LoraConfig(rank=8)} if method == "lora" else {}
        cfg = common.seed_config(size, Path(out), method=method, **lora)
        marks: list[float] = []
        last = warmup + steps

        def last_step(step: int) -> bool:
            marks.append(_now())
            return step == last  # a preemption's stop: the checkpoint is written, nothing exported

        cfg.train.max_steps = last + 1
        common.reset_peak_rss()
        with stop_at(last_step):
            result = train(cfg)
        newest = step_folders.complete_checkpoints(result.run_dir / "checkpoints")[0]
        size_mb = sum(f.stat().st_size for f in newest.rglob("*") if f.is_file()) / 2**20
        trainable = _trainable(newest)
    return {
        "s_per_step": (marks[last - 1] - marks[warmup - 1]) / steps,
        "peak_rss_mb": common.peak_rss_mb(),
        "checkpoint_mb": size_mb,
        "trainable": trainable,
        "threads": threads,
    }


def _trainable(checkpoint: Path) -> int:
    """Trained values in a checkpoint: what its EMA file averages (the same set as the optimizer's)."""
    from safetensors import safe_open

    with safe_open(str(checkpoint / "ema.safetensors"), "pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 (no __iter__)


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _rows(size: str, results: dict[str, list[dict[str, float]]]) -> list[list[str]]:
    full = [r["s_per_step"] for r in results["full"]]
    rows = []
    for method in METHODS:
        runs = results[method]
        times = [r["s_per_step"] for r in runs]
        ratios = [t / f for t, f in zip(times, full, strict=True)]
        rows.append(
            [
                size,
                method,
                f"{runs[0]['trainable']:,}",
                *common.spread(times),
                common.spread(ratios, "{:.2f}")[0],
                common.spread([r["peak_rss_mb"] for r in runs], "{:.0f}")[0],
                f"{runs[0]['checkpoint_mb']:.2f}",
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    choices = ["tiny", "small", "small_sdxl", "small_sd3", "small_flux"]
    parser.add_argument("--models", nargs="+", default=["small", "small_sdxl"], choices=choices)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.models[0], args.warmup, args.steps)))
        return
    rows: list[list[str]] = []
    raw: dict[str, Any] = {}
    for size in args.models:
        _prepare(size)
        extra = ["--models", size, "--warmup", str(args.warmup), "--steps", str(args.steps)]

        def child(method: str, extra: list[str] = extra) -> dict[str, float]:
            return common.child_json(["benchmarks.methods", "--one", method, *extra])

        raw[size] = common.run_rotating(size, METHODS, args.repeats, child)
        rows += _rows(size, raw[size])
    header = ["model", "method", "trained values", "s/step median", "min-max", "x full", "peak RSS MiB"]
    header += ["checkpoint MiB"]
    runs = f"{args.repeats} repeats x {args.steps} steps"
    title = f"Full fine-tuning vs LoRA rank 8, batch 4, EMA, fp32 ({common.machine()}; {runs})"
    common.save("methods", {"title": title, "args": vars(args), "results": raw})
    common.print_table(title, header, rows)


if __name__ == "__main__":
    main()
