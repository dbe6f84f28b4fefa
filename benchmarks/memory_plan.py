"""The memory plan, measured: activation bytes for its table, and its prediction against a real step's peak.

    python -m benchmarks.memory_plan activations   # measure, write sdcluster/assets/memory/activations.json
    python -m benchmarks.memory_plan compare       # predicted vs measured peak, a Markdown table
    python -m benchmarks.memory_plan transformer-scaling   # what the transformer scaling is checked on

What is measured, on CPU: the **sum of the bytes of every live tensor**
(:class:`benchmarks.live_bytes.LiveBytes`, a ``TorchDispatchMode`` that sees each tensor created and freed;
it gives torch's ``MemTracker``'s total, which cannot follow frozen weights), not peak RSS, which also holds
the Python heap, the libraries and the allocator's free lists. On CPU torch has no allocator counters (no
``torch.cuda.max_memory_allocated``), so this is the closest to what a GPU's allocator would report.

``activations``: for each model (``tiny``, ``tiny_sdxl``, ``small``, ``small_sdxl``, ``small_sd3``,
``small_flux``, see :mod:`benchmarks.common`) at two resolutions, with gradient checkpointing off and on, at
micro-batch 1 and 2:
one forward and backward of the denoiser with its family's real conditioning (the text encoders' outputs
for a caption, SDXL's pooled embedding and size/crop numbers), float32. ``sd1_true`` is SD 1.x's published
UNet at its true size (:data:`benchmarks.true_size_model.SD1_UNET`, random weights) at 256 px, the largest
resolution this CPU affords without checkpointing (about 10 GiB of memory, a few minutes); its conditioning
is random text states of CLIP ViT-L's shape (77 x 768): the activations depend on the shapes, not the values,
and the pipeline's 4 GiB folder, VAE and text encoder are not needed. Two numbers per pass: ``bytes``, its
peak minus the weights and the gradients it ends with (the activations are freed while the gradients are
made, so the two are not simply added; the definition of ``benchmarks/true_size.py``'s 0.84 GiB for SD 1.x
at 512 px), and ``forward``, what the forward leaves alive above the weights (where a LoRA step, whose
gradients are small, peaks). The plan scales them by the rule in :mod:`sdcluster.plan.activations`.

``compare``: the training job's own objects (:func:`sdcluster.train.trainer.build_trainer`, the loop's
micro-step, the EMA update) for three optimizer steps, the latent cache built beforehand and read from disk
(``data.cache_memory_mb=0``, so no cached array sits in memory as a tensor; on a GPU it would sit in host
memory anyway). Predicted is :mod:`sdcluster.plan` for the same config; the error is (predicted - measured) /
measured.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common

MODELS = ("tiny", "tiny_sdxl", "small", "small_sdxl", "small_sd3", "small_flux", "sd1_true")
RESOLUTIONS = {
    "tiny": (64, 128),
    "tiny_sdxl": (64, 128),
    "small": (128, 256),
    "small_sdxl": (128, 256),
    "small_sd3": (128, 256),
    "small_flux": (128, 256),
    "sd1_true": (256,),  # 512 px without checkpointing is beyond this CPU's memory
}
PIPELINES = MODELS[:-1]  # what `compare` trains: sd1_true is a bare UNet
TABLE = Path(__file__).resolve().parents[1] / "sdcluster" / "assets" / "memory" / "activations.json"


def model_folder(size: str) -> Path:
    """The pipeline folder of a benchmark model (the embedded ``tiny_sdxl`` too)."""
    if size == "tiny_sdxl":  # embedded, like tiny: built once in the benchmarks' cache
        from sdcluster.models.embedded import ensure_tiny_model

        return ensure_tiny_model(common.CACHE_ROOT, "tiny_sdxl")
    return common.model_path(size)


def _conditioning(comps: Any, batch: int, resolution: int) -> dict[str, Any]:
    """The denoiser's keyword arguments for ``batch`` copies of a caption, as the training loop makes them."""
    import torch

    family, caption = comps.family, ["a pair of denim jeans on a white background"] * batch
    pad = {"padding": "max_length", "return_tensors": "pt"}
    ids = {
        key: tok(caption, max_length=tok.model_max_length, **pad).input_ids
        for key, tok in family.tokenizers(comps).items()
    }
    with torch.no_grad():
        encoded = family.encode(comps, ids, "cpu")
    size = [resolution, resolution, 0, 0, resolution, resolution]  # original size, crop, target size
    return family.conditioning(encoded, torch.tensor([size] * batch, dtype=torch.float32))


def measure_activations(comps: Any, resolution: int, batch: int, checkpointing: bool) -> dict[str, int]:
    """:func:`measure_pass` of the components' denoiser with its family's real conditioning, called as its
    objective calls it in training (FLUX's packs the latents and adds the image ids and the guidance)."""
    from sdcluster.config import ModelConfig

    cond = _conditioning(comps, batch, resolution)
    flow = ModelConfig().flow_matching  # the schema's defaults: what the tiny and small models train with
    objective = comps.family.objective(comps.noise_scheduler, None, flow=flow)

    def call(latents: Any, timesteps: Any) -> Any:
        return objective.predict(comps.denoiser, latents, timesteps, cond)

    channels = comps.vae.config.latent_channels
    return measure_pass(comps.denoiser, cond, channels, resolution, checkpointing, call)


def measure_pass(
    denoiser: Any,
    cond: dict[str, Any],
    channels: int,
    resolution: int,
    checkpointing: bool,
    call: Any = None,
) -> dict[str, int]:
    """One forward and backward of a bare denoiser with its keyword arguments (whose batch it takes):
    ``bytes``, the pass's peak above the weights and the gradients it ends with, and ``forward``, the
    bytes the forward leaves alive above the weights (what autograd saved, and the output). A full
    fine-tune peaks in the backward pass with its gradients (``bytes``); a LoRA step, whose gradients are
    small, at the forward's end (``forward``). ``call(latents, timesteps)`` is the denoiser's call
    (default: a UNet's, with ``cond`` as its keywords)."""
    import torch
    import torch.nn.functional as F

    from benchmarks.live_bytes import LiveBytes

    denoiser = denoiser.train()
    denoiser.zero_grad(set_to_none=True)
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
    else:
        denoiser.disable_gradient_checkpointing()
    batch = cond["encoder_hidden_states"].shape[0]
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, channels, resolution // 8, resolution // 8, generator=gen)
    timesteps = torch.full((batch,), 500)
    with LiveBytes(*denoiser.parameters(), *denoiser.buffers()) as counter:
        weights = counter.current
        if call is None:
            out = denoiser(latents, timesteps, **cond, return_dict=False)[0]
        else:
            out = call(latents, timesteps)
        forward = counter.current - weights
        F.mse_loss(out, latents).backward()
        del out
    grads = sum(p.grad.untyped_storage().nbytes() for p in denoiser.parameters() if p.grad is not None)
    denoiser.zero_grad(set_to_none=True)  # the next pass starts without this one's gradients
    return {"bytes": max(counter.peak - weights - grads, 0), "forward": forward}


def true_size_entries(resolutions: tuple[int, ...]) -> list[dict[str, Any]]:
    """The ``sd1_true`` entries: SD 1.x's published UNet, random weights, CLIP ViT-L-shaped text states."""
    import torch
    from diffusers import UNet2DConditionModel

    from benchmarks.true_size_model import SD1_TEXT, SD1_UNET

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(SD1_UNET)
    params = sum(p.numel() for p in unet.parameters())
    tokens, hidden = SD1_TEXT["max_position_embeddings"], SD1_TEXT["hidden_size"]
    entries = []
    for resolution in resolutions:
        for checkpointing in (False, True):
            measured = {}
            for batch in (1, 2):
                cond = {"encoder_hidden_states": torch.randn(batch, tokens, hidden)}
                channels = SD1_UNET["in_channels"]
                measured[batch] = measure_pass(unet, cond, channels, resolution, checkpointing)
            entries.append(
                _entry(
                    "sd1_true",
                    "sd1",
                    params,
                    SD1_UNET["block_out_channels"][0],
                    resolution,
                    checkpointing,
                    measured,
                )
            )
            print(json.dumps(entries[-1]), flush=True)
    return entries


GPU_MODELS = {"sd1_true": 512, "sdxl_true": 1024}
"""The bare true-size UNets measured on a GPU, each at its native resolution."""
GPU_BATCHES = (1, 2, 8)


def measure_pass_cuda(denoiser: Any, cond: dict[str, Any], channels: int, resolution: int) -> dict[str, int]:
    """:func:`measure_pass` on a GPU under bf16 autocast, as the training loop runs it, from the allocator's
    counters: above the float32 weights (and ``bytes`` above the gradients too). Both hold whatever bf16
    copies of the weights autocast made that are still alive there (the plan then counts none with the
    weights); ``autocast_copies`` is their size if all were."""
    import torch
    import torch.nn.functional as F

    params = list(denoiser.parameters())
    copies = sum(p.numel() for p in params) * 2
    batch = cond["encoder_hidden_states"].shape[0]
    gen = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(batch, channels, resolution // 8, resolution // 8, generator=gen, device="cuda")
    timesteps = torch.full((batch,), 500, device="cuda")
    denoiser.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated()  # with the inputs, which the loop also holds before the pass
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = denoiser(latents, timesteps, **cond, return_dict=False)[0]
    forward = torch.cuda.memory_allocated() - weights
    F.mse_loss(out.float(), latents).backward()
    del out
    torch.cuda.synchronize()
    grads = sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)
    peak = torch.cuda.max_memory_allocated() - weights
    denoiser.zero_grad(set_to_none=True)
    return {"bytes": max(peak - grads, 0), "forward": forward, "autocast_copies": copies}


def gpu_entries() -> list[dict[str, Any]]:
    """The ``precision: bf16`` entries: SD 1.x's and SDXL's published UNets (random weights, made on the GPU)
    at 512 and 1024 px, gradient checkpointing off and on, micro-batches 1, 2 and 8, with conditioning of
    their text encoders' shapes (SDXL's pooled embedding and six size numbers too)."""
    import torch
    from diffusers import UNet2DConditionModel

    from benchmarks.published_configs import SDXL_TEXT_2, SDXL_UNET
    from benchmarks.true_size_model import SD1_TEXT, SD1_UNET

    entries = []
    for model, resolution in GPU_MODELS.items():
        config = SD1_UNET if model == "sd1_true" else SDXL_UNET
        torch.manual_seed(0)
        with torch.device("cuda"):
            unet = UNet2DConditionModel.from_config(config).train()
        params = sum(p.numel() for p in unet.parameters())
        tokens = SD1_TEXT["max_position_embeddings"]
        for checkpointing in (False, True):
            if checkpointing:
                unet.enable_gradient_checkpointing()
            else:
                unet.disable_gradient_checkpointing()
            measured = {}
            for batch in GPU_BATCHES:
                with torch.device("cuda"):
                    cond: dict[str, Any] = {
                        "encoder_hidden_states": torch.randn(batch, tokens, config["cross_attention_dim"])
                    }
                    if model == "sdxl_true":
                        cond["added_cond_kwargs"] = {
                            "text_embeds": torch.randn(batch, SDXL_TEXT_2["projection_dim"]),
                            "time_ids": torch.tensor(
                                [[resolution, resolution, 0, 0, resolution, resolution]] * batch
                            ),
                        }
                try:
                    measured[batch] = measure_pass_cuda(unet, cond, config["in_channels"], resolution)
                except torch.cuda.OutOfMemoryError:  # the line is then drawn through the batches that fit
                    print(f"{model} {resolution} px batch {batch}: out of memory", flush=True)
                    unet.zero_grad(set_to_none=True)
                del cond
                torch.cuda.empty_cache()
            family = "sd1" if model == "sd1_true" else "sdxl"
            entry = _entry(
                model, family, params, config["block_out_channels"][0], resolution, checkpointing, measured
            )
            copies = next(iter(measured.values()))["autocast_copies"]
            entries.append({**entry, "precision": "bf16", "autocast_copies": copies})
            print(json.dumps(entries[-1]), flush=True)
        del unet
        torch.cuda.empty_cache()
    return entries


def gpu_activations(args: argparse.Namespace) -> None:
    """Measure the GPU entries and put them in the table in place of earlier ones (the CPU entries stay)."""
    record = json.loads(TABLE.read_text())
    kept = [e for e in record["entries"] if e.get("precision", "fp32") == "fp32"]
    record["entries"] = kept + gpu_entries()
    record["gpu_machine"] = common.machine()
    TABLE.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {TABLE}")


def _entry(
    model: str, family: str, params: int, width: int | None, resolution: int, ckpt: bool, measured: dict
) -> dict[str, Any]:
    """A table entry from :func:`measure_pass`'s results by micro-batch."""
    return {
        "model": model,
        "family": family,
        "denoiser_params": params,
        "width": width,
        "resolution": resolution,
        "gradient_checkpointing": ckpt,
        "bytes": {str(b): m["bytes"] for b, m in measured.items()},
        "forward": {str(b): m["forward"] for b, m in measured.items()},
    }


def activations(args: argparse.Namespace) -> None:
    from sdcluster.config import ModelConfig
    from sdcluster.models.load import load_components
    from sdcluster.plan.sizes import model_sizes

    kept = json.loads(TABLE.read_text())["entries"] if TABLE.is_file() else []
    entries = [e for e in kept if e["model"] not in args.models]  # models not measured this time stay
    for size in args.models:
        if size == "sd1_true":  # no pipeline folder: the UNet alone (see the module)
            entries += true_size_entries(RESOLUTIONS[size])
            continue
        folder = model_folder(size)
        comps = load_components(ModelConfig(name=size, path=str(folder)), common.CACHE_ROOT)
        with tempfile.TemporaryDirectory() as out:
            sizes = model_sizes(_config(size, Path(out), "full"), folder)
        for resolution in RESOLUTIONS[size]:
            for checkpointing in (False, True):
                measured = {b: measure_activations(comps, resolution, b, checkpointing) for b in (1, 2)}
                entry = _entry(
                    size,
                    sizes.family,
                    sizes.denoiser,
                    sizes.denoiser_width,
                    resolution,
                    checkpointing,
                    measured,
                )
                print(json.dumps(entry), flush=True)
                entries.append(entry)
    record = {
        "what": "bytes of one denoiser forward + backward above its weights and gradients (bytes) and left "
        "alive by the forward above its weights (forward), float32, by micro-batch (python -m "
        "benchmarks.memory_plan activations; sum of live tensor bytes)",
        "machine": common.machine(),
        "entries": entries,
    }
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    TABLE.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {TABLE}")


def _config(size: str, out: Path, variant: str) -> Any:
    """The seed's run (batch 4, EMA) at the model's resolution, as the variant changes it."""
    import dataclasses

    from sdcluster.config.train import LoraConfig

    changes: dict[str, Any] = {"max_steps": 3, "validate_every": 0}
    if "lora" in variant:
        changes |= {"method": "lora", "lora": LoraConfig(rank=8)}
    if "ckpt" in variant:
        changes["gradient_checkpointing"] = True
    cfg = common.seed_config("tiny" if size == "tiny_sdxl" else size, out, **changes)
    cfg.model.path, cfg.model.name = str(model_folder(size)), size  # tiny_sdxl: at tiny's 64 px
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, cache_memory_mb=0))


def measure_peak(cfg: Any) -> int:
    """Peak tensor bytes of three optimizer steps of the training job's own objects (:class:`LiveBytes`:
    ``MemTracker`` cannot follow a LoRA step's frozen weights; on the full rows both give the same bytes)."""
    from benchmarks.live_bytes import LiveBytes, optimizer_tensors
    from sdcluster.train.loop import _loader, _micro_step
    from sdcluster.train.trainer import build_trainer

    t = build_trainer(cfg)
    batches = iter(_loader(t))  # builds the latent cache first, outside the measurement
    frozen = [t.comps.vae, *t.comps.text_encoders.values()]
    shadows = list(t.ema.shadow_params) if t.ema is not None else []
    tensors = [x for m in (*t.method.models, *frozen) for x in (*m.parameters(), *m.buffers())]
    with LiveBytes(*tensors, *optimizer_tensors(t.optimizer), *shadows) as counter:
        while t.step < cfg.train.max_steps:
            _micro_step(t, next(batches))
            if t.accelerator.sync_gradients:
                t.step += 1
                t.lr_scheduler.step()
                if t.ema is not None:
                    t.ema.step(t.params)
    return counter.peak


def compare_one(size: str, variant: str) -> dict[str, Any]:
    from sdcluster.plan.fit import plan_config

    with tempfile.TemporaryDirectory() as out:
        cfg = _config(size, Path(out), variant)
        planned = plan_config(cfg)
        assert planned is not None
        measured = measure_peak(cfg)
    predicted = planned.plan.total
    return {
        "model": size,
        "variant": variant,
        "parts": planned.plan.parts,
        "predicted": predicted,
        "measured": measured,
        "error": (predicted - measured) / measured,
    }


def compare(args: argparse.Namespace) -> None:
    """Each (model, variant) in a child process, so that nothing of one row is alive in the next."""
    rows, results = [], []
    for size in args.models:
        for variant in args.variants:
            res = common.child_json(["benchmarks.memory_plan", "one", size, variant])
            results.append(res)
            mib = 1024**2
            rows.append(
                [
                    size,
                    variant,
                    f"{res['predicted'] / mib:.1f}",
                    f"{res['measured'] / mib:.1f}",
                    f"{100 * res['error']:+.1f}%",
                    f"{res['parts']['activations'] / mib:.1f}",
                ]
            )
    header = ["model", "variant", "predicted MiB", "measured MiB", "error", "of which activations MiB"]
    title = f"Memory plan vs measured peak tensor bytes ({common.machine()})"
    table = common.print_table(title, header, rows)
    common.save("memory_plan", {"machine": common.machine(), "results": results, "table": table})


SCALING = Path(__file__).resolve().parent / "results" / "transformer_scaling.json"
# Twice the measured small models' width and depth: what the plan's transformer scaling is checked on
MEDIUM = {
    "medium_flux": {
        **common.SMALL_FLUX_TRANSFORMER,
        "num_layers": 4,
        "num_single_layers": 8,
        "num_attention_heads": 8,
    },
    "medium_sd3": {
        **common.SMALL_SD3_TRANSFORMER,
        "num_layers": 12,
        "num_attention_heads": 8,
        "caption_projection_dim": 512,
    },
}


def transformer_scaling(args: argparse.Namespace) -> None:
    """Measure FLUX- and SD3-shaped models twice as wide and deep as ``small_flux`` and ``small_sd3`` (not in
    the table), for the test that holds the plan's estimate of them against what they measure."""
    from sdcluster.config import ModelConfig
    from sdcluster.models.load import load_components
    from sdcluster.models.tiny_flux import build_flux_pipeline
    from sdcluster.models.tiny_sd3 import build_sd3_pipeline

    models = []
    for name, transformer in MEDIUM.items():
        folder = common.CACHE_ROOT / "models" / name
        if not (folder / "model_index.json").is_file():
            if name == "medium_flux":
                build_flux_pipeline(folder, transformer, common.SMALL_VAE, common.SMALL_TEXT, common.SMALL_T5)
            else:
                build_sd3_pipeline(
                    folder, transformer, common.SMALL_VAE, common.SMALL_SDXL_TEXT, common.SMALL_T5
                )
        comps = load_components(ModelConfig(name=name, path=str(folder)), common.CACHE_ROOT)
        family = comps.family
        entry = {
            "model": name,
            "family": family.name,
            "denoiser_params": sum(p.numel() for p in comps.denoiser.parameters()),
            "width": family.denoiser_width(comps.denoiser.config),
            "sequence": family.token_sequence(),
            "measured": [],
        }
        for resolution in (128, 256):
            for checkpointing in (False, True):
                for batch in (1, 2):
                    got = measure_activations(comps, resolution, batch, checkpointing)
                    entry["measured"].append(
                        {"resolution": resolution, "checkpointing": checkpointing, "batch": batch, **got}
                    )
        print(json.dumps(entry), flush=True)
        models.append(entry)
    SCALING.write_text(json.dumps({"machine": common.machine(), "models": models}, indent=1) + "\n")
    print(f"wrote {SCALING}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_plan", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    act = sub.add_parser("activations", help="measure the activation table the plan ships")
    act.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    sub.add_parser("gpu-activations", help="measure the table's bf16 entries (on a GPU)")
    cmp_ = sub.add_parser("compare", help="predicted vs measured peak")
    cmp_.add_argument("--models", nargs="+", default=list(PIPELINES), choices=PIPELINES)
    cmp_.add_argument("--variants", nargs="+", default=["full", "full+ckpt", "lora"])
    sub.add_parser("transformer-scaling", help="measure the models the transformer scaling is checked on")
    one = sub.add_parser("one", help="one row of compare, in this process (JSON on the last line)")
    one.add_argument("size", choices=PIPELINES)
    one.add_argument("variant")
    args = parser.parse_args(argv)
    common.set_threads()
    if args.command == "activations":
        activations(args)
    elif args.command == "gpu-activations":
        gpu_activations(args)
    elif args.command == "compare":
        compare(args)
    elif args.command == "transformer-scaling":
        transformer_scaling(args)
    else:
        print(json.dumps(compare_one(args.size, args.variant)))


if __name__ == "__main__":
    main()
