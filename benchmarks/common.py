"""What every benchmark shares: the two model sizes, the seed's settings, statistics, tables, peak memory.

Models (random weights, built offline like :mod:`sdcluster.tiny_model`, real diffusers/transformers classes):

* ``tiny``: the embedded test model (1.4M-parameter UNet) at 64 px.
* ``small``: SD-1.x-shaped at about 1/5 width: UNet (64, 128, 256, 256) with SD 1.x's block layout
  (34.5M parameters) at 128 px; VAE (24, 48, 96, 96) so that its encoder costs 1.3x a UNet forward (SD 1.4 at
  512 px: 558 / 402 GFLOP = 1.4x); a 2-layer, 160-wide CLIP text encoder (about 5% of a UNet forward, as in
  SD 1.x).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CACHE_ROOT = Path(os.environ.get("SDCLUSTER_BENCH_CACHE", Path(tempfile.gettempdir()) / "sdcluster-bench"))
RESOLUTION = {"tiny": 64, "small": 128}
SMALL_VERSION = "1"


def build_small_pipeline(dest: Path) -> Path:
    """Write the ``small`` pipeline folder (fixed seeds, so every machine builds the same weights)."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdcluster.tiny_model import write_tokenizer

    with tempfile.TemporaryDirectory() as work:
        vocab = write_tokenizer(Path(work))
        tokenizer = CLIPTokenizer.from_pretrained(work)
    torch.manual_seed(0)  # before each component: the same weights whatever else changes
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=160,
        attention_head_dim=8,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(24, 48, 96, 96),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=8,
        sample_size=128,
    )
    text_config = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=160,
        intermediate_size=640,
        num_hidden_layers=2,
        num_attention_heads=8,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(text_config)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest


def model_path(size: str) -> Path:
    """The pipeline folder of ``tiny`` or ``small``, built on first use under :data:`CACHE_ROOT`."""
    if size == "tiny":
        from sdcluster.tiny_model import ensure_tiny_model

        return ensure_tiny_model(CACHE_ROOT)
    dest = CACHE_ROOT / "models" / f"small-v{SMALL_VERSION}"
    if not (dest / "model_index.json").is_file():
        work = Path(tempfile.mkdtemp(prefix=".building-", dir=CACHE_ROOT))
        build_small_pipeline(work / "model")
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

    from sdcluster.distributed import cpu_threads

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


def spread(values: Sequence[float], fmt: str = "{:.3f}") -> tuple[str, str]:
    """(median, "min-max") as text."""
    return fmt.format(statistics.median(values)), f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pastes into the README as is); printed and returned."""
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
    """Keep the raw numbers next to the tables (``benchmarks/results/<name>.json``)."""
    folder = Path(__file__).resolve().parent / "results"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(record, indent=1))
