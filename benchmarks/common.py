"""What every benchmark shares: the two model sizes, the seed's settings, statistics, tables, peak memory.

Models (random weights, built offline like :mod:`sdcluster.models.tiny`, real diffusers/transformers classes):

* ``tiny``: the embedded test model (1.4M-parameter UNet) at 64 px.
* ``small``: SD-1.x-shaped at about 1/5 width: UNet (64, 128, 256, 256) with SD 1.x's block layout
  (34.5M parameters) at 128 px; VAE (24, 48, 96, 96) so that its encoder costs 1.3x a UNet forward (SD 1.4 at
  512 px: 558 / 402 GFLOP = 1.4x); a 2-layer, 160-wide CLIP text encoder (about 5% of a UNet forward, as in
  SD 1.x).
* ``small_sdxl``: SDXL-shaped at about 1/5 width: SDXL's 3-level UNet layout (64, 128, 256) with 1, 2 and 4
  transformer layers per attention block (SDXL: 320/640/1280, 1/2/10), linear projections, the ``text_time``
  size/crop embedding; two 160-wide text encoders concatenated (320 cross-attention channels, the second one
  pooled), the ``small`` VAE, at 256 px (SDXL trains at twice SD 1.x's resolution).
* ``small_sd3``: SD-3.5-shaped: an MMDiT (``SD3Transformer2DModel``, patch 2, 64-channel heads as SD 3.5's) of
  6 joint blocks at width 256 (SD 3.5 Medium: 24 at 1536), two 160-wide CLIP encoders with projections, a
  2-layer T5 of width 320 (T5-XXL: 24 layers of 4096) that the CLIP states are padded to, the ``small`` VAE
  with 16 latent channels, at 256 px.
* ``small_flux``: FLUX.1-dev-shaped: ``FluxTransformer2DModel`` with 2 double-stream and 4 single-stream
  blocks (FLUX.1: 19 and 38) at width 256 in 64-channel heads, the guidance embedding, rotary axes (8, 28, 28)
  (FLUX: (16, 56, 56)), packed latents of the 16-channel ``small`` VAE, one 160-wide CLIP (pooled) and the T5
  at FLUX's 512 tokens, at 256 px.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sdcluster.models.tiny_flux import TINY_FLUX_TRANSFORMER  # configs only: torch is imported by the builds
from sdcluster.models.tiny_sd3 import TINY_SD3_TRANSFORMER

CACHE_ROOT = Path(os.environ.get("SDCLUSTER_BENCH_CACHE", Path(tempfile.gettempdir()) / "sdcluster-bench"))
RESOLUTION = {
    "tiny": 64,
    "small": 128,
    "small_sdxl": 256,
    "small_sd3": 256,
    "small_flux": 256,
    "small_flux_t5_large": 256,
    "sdxl": 1024,
}
SMALL_VERSION = "1"
SMALL_SDXL_VERSION = "1"
SMALL_FLOW_VERSION = "1"  # small_sd3 and small_flux


SMALL_UNET: dict[str, Any] = {
    "sample_size": 16,
    "block_out_channels": (64, 128, 256, 256),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 160,
    "attention_head_dim": 8,
}
SMALL_VAE: dict[str, Any] = {
    "block_out_channels": (24, 48, 96, 96),
    "layers_per_block": 2,
    "sample_size": 128,
}
SMALL_TEXT: dict[str, Any] = {
    "hidden_size": 160,
    "intermediate_size": 640,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
}


SMALL_SDXL_UNET: dict[str, Any] = {
    "sample_size": 32,
    "block_out_channels": (64, 128, 256),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 4),
    "attention_head_dim": (1, 2, 4),  # 64 channels a head, as SDXL's (5, 10, 20) heads of 320/640/1280
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 32,
    "cross_attention_dim": 320,
    "projection_class_embeddings_input_dim": 6 * 32 + 160,
}
SMALL_SDXL_TEXT: dict[str, Any] = {**SMALL_TEXT, "projection_dim": 160}

SMALL_T5: dict[str, Any] = {  # T5 v1.1 (gated GELU) as SD 3.5 and FLUX ship it, 2 layers at width 320
    "d_model": 320,
    "d_kv": 64,
    "d_ff": 640,
    "num_layers": 2,
    "num_heads": 5,
    "relative_attention_num_buckets": 32,
    "feed_forward_proj": "gated-gelu",
}
LARGE_T5: dict[str, Any] = {  # T5 v1.1-large's encoder shape (308M parameters in its 24 layers)
    **SMALL_T5,
    "d_model": 1024,
    "d_ff": 2816,
    "num_layers": 24,
    "num_heads": 16,
}
SMALL_SD3_TRANSFORMER: dict[str, Any] = {
    **TINY_SD3_TRANSFORMER,  # patch size 2, 16 output channels: SD 3.5's
    "sample_size": 32,  # latents of 256 px images
    "num_layers": 6,
    "attention_head_dim": 64,
    "caption_projection_dim": 256,
    "joint_attention_dim": SMALL_T5["d_model"],  # the T5 width: the CLIP states (160 + 160) are padded to it
    "pooled_projection_dim": 2 * SMALL_SDXL_TEXT["projection_dim"],  # the two CLIP projections, concatenated
    "pos_embed_max_size": 32,
}
SMALL_FLUX_TRANSFORMER: dict[str, Any] = {
    **TINY_FLUX_TRANSFORMER,  # packed latents (64 input channels), the guidance embedding: FLUX.1-dev's
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 64,
    "num_attention_heads": 4,
    "joint_attention_dim": SMALL_T5["d_model"],
    "pooled_projection_dim": SMALL_TEXT["hidden_size"],  # CLIP's pooled output
    "axes_dims_rope": (8, 28, 28),
}


def build_small_pipeline(dest: Path) -> Path:
    """Write the ``small`` pipeline folder (fixed seeds, so every machine builds the same weights)."""
    from sdcluster.models.tiny import build_pipeline

    return build_pipeline(dest, SMALL_UNET, SMALL_VAE, SMALL_TEXT)


def model_path(size: str) -> Path:
    """The pipeline folder of ``tiny`` or ``small``, built on first use under :data:`CACHE_ROOT`."""
    if size == "tiny":
        from sdcluster.models.embedded import ensure_tiny_model

        return ensure_tiny_model(CACHE_ROOT)
    if size == "small_sdxl":
        from sdcluster.models.tiny_sdxl import build_sdxl_pipeline

        version = SMALL_SDXL_VERSION

        def build(dest: Path) -> Path:
            return build_sdxl_pipeline(dest, SMALL_SDXL_UNET, SMALL_VAE, SMALL_SDXL_TEXT)
    elif size == "small_sd3":
        from sdcluster.models.tiny_sd3 import build_sd3_pipeline

        version = SMALL_FLOW_VERSION

        def build(dest: Path) -> Path:
            return build_sd3_pipeline(dest, SMALL_SD3_TRANSFORMER, SMALL_VAE, SMALL_SDXL_TEXT, SMALL_T5)
    elif size == "small_flux":
        from sdcluster.models.tiny_flux import build_flux_pipeline

        version = SMALL_FLOW_VERSION

        def build(dest: Path) -> Path:
            return build_flux_pipeline(dest, SMALL_FLUX_TRANSFORMER, SMALL_VAE, SMALL_TEXT, SMALL_T5)
    elif size == "small_flux_t5_large":  # small_flux with a T5 of T5-large's shape: what loading T5 costs
        from sdcluster.models.tiny_flux import build_flux_pipeline

        version = SMALL_FLOW_VERSION
        transformer = {**SMALL_FLUX_TRANSFORMER, "joint_attention_dim": LARGE_T5["d_model"]}

        def build(dest: Path) -> Path:
            return build_flux_pipeline(dest, transformer, SMALL_VAE, SMALL_TEXT, LARGE_T5)
    else:
        version, build = SMALL_VERSION, build_small_pipeline
    dest = CACHE_ROOT / "models" / f"{size.replace('_', '-')}-v{version}"
    if not (dest / "model_index.json").is_file():
        CACHE_ROOT.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".building-", dir=CACHE_ROOT))
        build(work / "model")
        os.replace(work / "model", dest)
    return dest


def seed_config(size: str, output_root: Path, **train: Any) -> Any:
    """The seed's run at benchmark scale: batch 4, EMA, center crop + flip, lr 1e-5 constant, clip 1.0."""
    from sdcluster.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
    from sdcluster.paths import sample_data_dir

    settings = {
        "batch_size": 4,
        "resolution": RESOLUTION[size],
        "center_crop": True,
        "random_flip": True,
        "use_ema": True,
        "log_every": 10,
        "checkpoint_every": 100_000,
        "validate_every": 0,  # the held-out loss at the end only, no images: what was measured before
        "validation_prompts": [],
        **train,
    }
    return Config(
        task="train",
        output_root=str(output_root),
        jobs_root=str(output_root / "jobs"),
        cache_root=str(CACHE_ROOT),
        model=ModelConfig(name=size, path=str(model_path(size))),
        data=DataConfig(path=str(sample_data_dir()), holdout=0),
        optim=OptimConfig(lr=1e-5, max_grad_norm=1.0),
        train=TrainConfig(**settings),
    )


def set_threads() -> int:
    """Size torch's threads as a job does (the CPU allocation), so every variant runs on the same pool."""
    import torch

    from sdcluster.runtime.distributed import cpu_threads

    torch.set_num_threads(cpu_threads(1))
    return torch.get_num_threads()


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    with contextlib.suppress(OSError):  # not Linux, or not allowed: the peak then covers the whole process
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last :func:`reset_peak_rss`, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_rotating(
    size: str, variants: Sequence[str], repeats: int, child: Callable[[str], dict[str, float]]
) -> dict[str, list[dict[str, float]]]:
    """``child(variant)`` for every (repeat, variant), variants in rotating order.

    Each child is a fresh process run one after the other, so a peak RSS is that variant's alone, and a
    slow moment of a shared machine spreads over all variants instead of hitting one.
    """
    results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for repeat in range(repeats):
        shift = repeat % len(variants)
        for variant in [*variants[shift:], *variants[:shift]]:
            results[variant].append(child(variant))
            print(f"{size} repeat {repeat} {variant}: {results[variant][-1]}", file=sys.stderr, flush=True)
    return results


def child_json(args: Sequence[str]) -> dict[str, float]:
    """Run ``python -m <args>`` and return the JSON its last stdout line prints."""
    proc = subprocess.run([sys.executable, "-m", *args], check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child_streamed(argv: Sequence[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``argv`` passing its output on to our stderr line by line (a long job's log can be followed);
    return the JSON its last line prints, or ``{"failed": ...}`` so that the other measurements still run."""
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    last = ""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", file=sys.stderr, flush=True)
            last = line if line.strip() else last
    if proc.returncode:
        return {"failed": f"exit status {proc.returncode} (its log is above)"}
    return json.loads(last)


def spread(values: Sequence[float], fmt: str = "{:.3f}") -> tuple[str, str]:
    """(median, "min-max") as text."""
    return fmt.format(statistics.median(values)), f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pastes into docs/performance.md as is); printed and returned."""
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def machine() -> str:
    """One line naming what the numbers were measured on."""
    import platform

    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{cpus} CPU cores"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{device}, torch {torch.__version__}, python {platform.python_version()}, load avg {load:.1f}"


def save(name: str, record: dict[str, Any]) -> None:
    """Keep the raw numbers next to the tables (``benchmarks/results/<name>.json``). A record of results
    per model (``{"results": {model: ...}}``) is merged into the saved one: a run of some models keeps the
    others' numbers (each model's entry says what it was measured with: ``runs`` below)."""
    folder = Path(__file__).resolve().parent / "results"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.json"
    if isinstance(record.get("results"), dict) and path.is_file():
        saved = json.loads(path.read_text())
        runs = saved.get("runs") or {
            model: {"title": saved.get("title"), "args": saved.get("args")}
            for model in saved.get("results", {})
        }
        runs.update(
            {model: {"title": record.get("title"), "args": record.get("args")} for model in record["results"]}
        )
        record = {**record, "results": {**saved.get("results", {}), **record["results"]}, "runs": runs}
    path.write_text(json.dumps(record, indent=1))
