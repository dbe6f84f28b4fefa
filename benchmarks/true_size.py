"""The seed's recipe at SD 1.x's true size on CPU, through sdcluster's own job path; does it fit in memory?

    nice -n 10 python -m benchmarks.true_size                 # SD 1.x (860M UNet), 512 px: tens of minutes
    python -m benchmarks.true_size --model small              # the same path on the small model, ~2 min
    python -m benchmarks.true_size --steps 2 --phases budget train   # a shorter run; the rest is "pending"

The recipe is ``experiment=jeans_sd14`` composed through Hydra exactly as the launcher does, minus the
GPU-only half precision (``train.mixed_precision=no``): 512 px, batch 1 x accumulation 4, gradient
checkpointing, EMA, latent cache, on the shipped sample images, with ``model.path`` the random-weight
SD 1.x of :mod:`benchmarks.true_size_model`. Phases, each a fresh process so that its peak resident
memory is its own:

* **budget**: where the memory goes: exact bytes of weights, gradients, AdamW states, EMA and the frozen
  VAE + text encoder, and the activations of one 512 px micro-step measured (peak RSS growth minus the
  gradients), against this machine's RAM: which part does not fit, if one does not.
* **train**: :func:`sdcluster.train.loop.train` (what the local executor and SLURM run) stopped after
  ``steps - 1`` optimizer steps the way a preemption stops it: a collective checkpoint save.
* **resume**: the same call again (a new job): it resumes from that checkpoint, trains the last step, saves
  the final checkpoint and exports the pipeline (EMA weights).
* **generate**: :func:`sdcluster.generate.job.generate_images` (the generation job) on the export: one prompt,
  two 512 px images in one batch.

Seconds per optimizer step come from ``metrics.jsonl`` (``train.log_every=1``): the gaps between steps after
the first (the first also builds the latent cache). Writes ``benchmarks/results/true_size.json`` after every
phase (a phase not run is marked pending) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.true_size_phases import (
    model_folder,
    phase_budget,
    phase_generate,
    phase_resume,
    phase_train,
)

PHASES = ("budget", "train", "resume", "generate")
PROMPT = "A single pair of denim jeans laid flat on a white background, viewed from the front."


def sample_subset(dest: Path, images: int) -> Path:
    """The first ``images`` shipped sample images as a dataset folder: the latent cache (built by the first
    job from every image and its mirror) is work in proportion to the dataset, not to the step measured."""
    from sdcluster.paths import sample_data_dir

    rows = (sample_data_dir() / "metadata.jsonl").read_text().splitlines()[:images]
    dest.mkdir(parents=True, exist_ok=True)
    for row in rows:
        name = json.loads(row)["file_name"]
        shutil.copyfile(sample_data_dir() / name, dest / name)
    (dest / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return dest


def compose(
    size: str,
    out: Path,
    steps: int,
    gen_steps: int,
    precision: str = "no",
    extra=(),
    images: int = 0,
    model_path: Path | None = None,
) -> Any:
    """``experiment=jeans_sd14`` composed as ``python -m sdcluster.launch`` composes it; on CPU (``no``) by
    default, in ``precision`` (fp16, bf16) for :mod:`benchmarks.gpu_table`; ``extra``: more overrides;
    ``model_path``: another folder of the same model (its published configs alone, to plan it)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from sdcluster.config.store import conf_dir
    from sdcluster.launch import to_config

    overrides = [
        "experiment=jeans_sd14",
        f"train.mixed_precision={precision}",  # fp16 needs a GPU: benchmarks.gpu_table measures it
        f"generate.mixed_precision={precision}",
        f"model.name={size}",
        f"model.path={model_path or model_folder(size)}",
        f"output_root={out}",
        f"jobs_root={out / 'jobs'}",
        f"cache_root={out / 'cache'}",
        f"train.max_steps={steps}",
        "train.log_every=1",
        "train.checkpoint_every=100000",  # the saves measured are the preemption's and the final one
        "train.validate_every=0",
        "train.validation_prompts=[]",
        f"generate.prompts=[{json.dumps(PROMPT)}]",
        "generate.num_images=2",
        "generate.batch_size=2",
        f"generate.steps={gen_steps}",
        "generate.scheduler=pndm",  # the model's own, as the seed's inference.py used it
        *extra,
    ]
    if images:  # a smaller dataset (one image held out for the validation loss): a shorter cache build
        data = sample_subset(out / "data", images)
        overrides += ["data=imagefolder", f"data.path={data}", "data.holdout=1"]
    if size != "sd1":
        res = common.RESOLUTION[size]
        overrides += [f"train.resolution={res}", f"generate.height={res}", f"generate.width={res}"]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        return to_config(hydra_compose(config_name="config", overrides=overrides))


def run_one(phase: str, args: argparse.Namespace) -> dict[str, Any]:
    threads = common.set_threads()
    out = Path(args.workdir)
    cfg = compose(args.model, out, args.steps, args.gen_steps, images=args.images)
    if phase == "budget":
        record = phase_budget(args.model)
    elif phase == "train":
        record = phase_train(cfg, args.steps - 1)
    elif phase == "resume":
        record = phase_resume(cfg)
    else:
        record = phase_generate(cfg, args.model_dir)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # data workers, if any
    return {**record, "peak_rss_mib": max(common.peak_rss_mb(), children), "threads": threads}


def _child(phase: str, args: argparse.Namespace, model_dir: str | None) -> dict[str, Any]:
    """One phase in a fresh process; its log goes to our stderr, so a long run can be followed."""
    argv = [sys.executable, "-m", "benchmarks.true_size", "--one", phase, "--model", args.model]
    argv += ["--steps", str(args.steps), "--gen-steps", str(args.gen_steps), "--workdir", args.workdir]
    argv += ["--images", str(args.images)]
    argv += ["--model-dir", model_dir] if model_dir else []
    return common.child_streamed(argv)


def table_rows(record: dict[str, Any]) -> list[list[str]]:
    """What docs/performance.md shows: one row per measurement, "pending" for what was not measured."""
    res = record["results"]

    def get(phase: str, key: str, fmt: str = "{:.1f}") -> str:
        value = res.get(phase, {}).get(key)
        if value is None:
            return "pending"
        if isinstance(value, list):
            return " / ".join(fmt.format(v) for v in value) if value else "pending"
        return fmt.format(value)

    gen = res.get("generate", {})
    gen_shape = f"{gen.get('images', 2)} images in one batch, {gen.get('steps', '?')} steps"
    budget = res.get("budget", {}).get("parts_gib", {})
    rows = [[f"memory: {k.replace('_', ' ')} (GiB)", f"{v:.2f}"] for k, v in budget.items()]
    rows += [
        ["memory: sum of the parts (GiB)", get("budget", "sum_gib", "{:.2f}")],
        ["machine RAM (GiB)", get("budget", "machine_ram_gib", "{:.1f}")],
        ["s / optimizer step (4 micro-steps), steady", get("train", "step_s")],
        ["s / first step, latent cache build excluded", get("train", "first_step_without_cache_s")],
        ["s to build the latent cache (first job only)", get("train", "latent_cache_build_s")],
        ["s / step after the resume", get("resume", "step_s")],
        ["peak RSS training (GiB)", get("train", "peak_rss_mib", "{:.0f}")],
        ["checkpoint size (GiB)", get("train", "checkpoint_gib", "{:.2f}")],
        ["checkpoint save s (at the stop / final)", _pair(res, "checkpoint_save_s")],
        ["resume: load until training s", get("resume", "resume_load_s")],
        ["peak RSS resume + export (GiB)", get("resume", "peak_rss_mib", "{:.0f}")],
        ["export s (EMA weights, safetensors)", get("resume", "export_s")],
        [f"generation s / image ({gen_shape}, pipeline load included)", get("generate", "s_per_image")],
        ["peak RSS generation (GiB)", get("generate", "peak_rss_mib", "{:.0f}")],
    ]
    rows.append(["fits in this machine's RAM", _verdict(res)])
    for row in rows:  # RSS is measured in MiB: shown in GiB like the rest
        if "RSS" in row[0] and row[1] != "pending":
            row[1] = f"{float(row[1]) / 1024:.1f}"
    return rows


def _verdict(res: dict[str, Any]) -> str:
    """Yes with the margin, or which part of the budget is the one to cut (the largest)."""
    budget = res.get("budget", {})
    peaks = [res.get(p, {}).get("peak_rss_mib") for p in ("train", "resume", "generate")]
    peaks = [p / 1024 for p in peaks if p is not None]
    if not budget.get("parts_gib") or not peaks:
        return "pending"
    ram, peak = budget["machine_ram_gib"], max(peaks)
    if max(peak, budget["sum_gib"]) < ram:
        return f"yes: peak {peak:.1f} of {ram:.1f} GiB"
    largest = max(budget["parts_gib"].items(), key=lambda kv: kv[1])
    return f"no: peak {peak:.1f} of {ram:.1f} GiB; largest part {largest[0]} ({largest[1]:.1f} GiB)"


def _pair(res: dict[str, Any], key: str) -> str:
    values = [res.get(p, {}).get(key) for p in ("train", "resume")]
    return " / ".join("pending" if v is None else f"{v:.1f}" for v in values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd1", choices=["sd1", "small", "tiny"])
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps, the last after a resume")
    parser.add_argument("--gen-steps", type=int, default=20, help="denoising steps per generated image")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    parser.add_argument("--images", type=int, default=0, help="use the first N sample images; 0: all")
    parser.add_argument("--workdir", default=str(common.CACHE_ROOT / "true-size-run"))
    parser.add_argument("--keep", action="store_true", help="keep the run folder (checkpoints, export)")
    parser.add_argument("--report", action="store_true", help="print the table of the saved results only")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.report:
        report(f"true_size{'' if args.model == 'sd1' else '_' + args.model}")
        return
    if args.steps < 2:
        parser.error("--steps must be >= 2: one step before the checkpoint, one after the resume")
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    model_folder(args.model)  # built once, outside every measurement
    if "train" in args.phases:  # a fresh run: the resume must find only this run's checkpoint
        shutil.rmtree(args.workdir, ignore_errors=True)
    name = f"true_size{'' if args.model == 'sd1' else '_' + args.model}"
    earlier = _earlier_results(name)
    record: dict[str, Any] = {"machine": common.machine(), "args": vars(args), "results": {}}
    model_dir = earlier.get("resume", {}).get("model_dir") if "resume" not in args.phases else None
    for phase in PHASES:
        if phase not in args.phases and phase in earlier:  # measured by an earlier invocation: kept
            record["results"][phase] = {**earlier[phase], "from_earlier_run": True}
            continue
        if phase not in args.phases or (phase == "generate" and model_dir is None):
            record["results"][phase] = {"pending": "not run (--phases, or no export to generate from)"}
            continue
        record["results"][phase] = _child(phase, args, model_dir)
        model_dir = record["results"][phase].get("model_dir", model_dir)
        common.save(name, record)
        print(f"{phase}: {record['results'][phase]}", flush=True)
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    title = f"SD 1.x recipe on CPU, model {args.model} ({record['machine']})"
    record["table"] = common.print_table(title, ["measurement", "value"], table_rows(record))
    common.save(name, record)


def _earlier_results(name: str) -> dict[str, Any]:
    """Phases an earlier invocation measured (neither pending nor failed), to run the rest later."""
    path = Path(__file__).resolve().parent / "results" / f"{name}.json"
    if not path.is_file():
        return {}
    results = json.loads(path.read_text()).get("results", {})
    return {k: v for k, v in results.items() if "pending" not in v and "failed" not in v}


def report(name: str) -> None:
    """The table of ``results/<name>.json`` as it stands; a phase stopped before it reported is pending."""
    path = Path(__file__).resolve().parent / "results" / f"{name}.json"
    record = json.loads(path.read_text())
    for phase in PHASES:
        if phase not in record["results"]:
            record["results"][phase] = {"pending": "not finished before the deadline of this run"}
    title = f"SD 1.x recipe on CPU, model {record['args']['model']} ({record['machine']})"
    record["table"] = common.print_table(title, ["measurement", "value"], table_rows(record))
    common.save(name, record)


if __name__ == "__main__":
    main()
