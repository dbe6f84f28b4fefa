"""Time from process start to the first optimizer step of a training job (tiny model, cache already built).

    python -m benchmarks.startup                 # 5 fresh processes, table of median and min-max
    python -m benchmarks.startup --importtime    # plus where one start's import time goes
    python -m benchmarks.startup --model small_flux_t5_large --text-encoders   # cached FLUX: T5 loaded or not

``--text-encoders`` starts each repeat twice: as a cached run starts now (no text encoder loaded: the latent
cache and the text store hold their outputs) and with every text encoder loaded at start, as every run did
before they were loaded on first use; ``small_flux_t5_large`` is ``small_flux`` with a T5 of T5 v1.1-large's
shape (308M parameters), so what T5 costs shows; T5-XXL (4.7B) costs about 15 times that.

Each repeat starts a fresh interpreter that runs what a SLURM task runs after unpickling its job:
:func:`sdcluster.runtime.callables.run_job` (logging, torch threads, job record) around
:func:`sdcluster.train.loop.train`, stopped at step 1 by a ``stop_at`` observer. The clock starts just before
the parent spawns the process, so interpreter start-up and every import count. The latent cache and the tiny
model are built beforehand (a cache build is a one-off per dataset, not start-up).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common


def child(
    started: float, out: Path, model: str = "tiny", eager_text: bool = False, precision: str = "no"
) -> None:
    """The measured process: a training job that stops after its first optimizer step; ``eager_text``:
    every text encoder loaded with the model (what every run did before they were loaded on first use)."""
    from sdcluster.runtime import callables

    marks = {"interpreter up": time.time() - started}
    cfg = common.seed_config(model, out, batch_size=2, use_ema=False, max_steps=40, mixed_precision=precision)
    if eager_text:
        from sdcluster.train import trainer

        lazy = trainer.load_components

        def eager(*args, **kwargs):
            comps = lazy(*args, **kwargs)
            list(comps.text_encoders.values())  # each one read, so loaded
            return comps

        trainer.load_components = eager

    def body(cfg, flag, dist):
        from sdcluster.runtime.step_events import stop_at
        from sdcluster.train.loop import train

        def first_step(step: int) -> bool:
            marks["first optimizer step"] = time.time() - started
            return True

        marks["job body starts"] = time.time() - started
        with stop_at(first_step):
            result = train(cfg, flag=flag)
        return callables.Outcome(False, result.step)

    callables.run_job(cfg, "train", body)
    print(json.dumps({**marks, "peak_rss_mb": common.peak_rss_mb()}))


def _spawn(
    out: Path, importtime: bool = False, model: str = "tiny", eager_text: bool = False, precision: str = "no"
) -> tuple[dict[str, float], str]:
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else [])]
    cmd += ["-m", "benchmarks.startup", "--child", str(out), "--model", model, "--precision", precision]
    cmd += ["--eager-text"] if eager_text else []
    started = time.time()
    proc = subprocess.run([*cmd, "--started", repr(started)], check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def top_imports(stderr: str, count: int = 12) -> list[list[str]]:
    """The slowest imports of one start, as (seconds, module) of each top-level import's whole subtree."""
    rows = []
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if match and len(match[2]) <= 2:  # top level, as the program asked for it
            rows.append((int(match[1]) / 1e6, match[3]))
    rows.sort(reverse=True)
    return [[f"{seconds:.2f}", name] for seconds, name in rows[:count]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--importtime", action="store_true")
    parser.add_argument("--model", default="tiny", choices=sorted(common.RESOLUTION))
    parser.add_argument("--text-encoders", action="store_true", help="each start without and with them")
    parser.add_argument(
        "--precision", default="no", choices=["no", "bf16"], help="train.mixed_precision (bf16: a GPU's)"
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--eager-text", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.started, args.child, args.model, args.eager_text, args.precision)
        return
    with tempfile.TemporaryDirectory() as out:  # builds the model, the cache and the text store, untimed
        from sdcluster.train.loop import train

        cfg = common.seed_config(
            args.model, Path(out), batch_size=2, use_ema=False, max_steps=1, mixed_precision=args.precision
        )
        train(cfg)
    if args.text_encoders:
        _text_encoders(args)
        return
    runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            runs.append(_spawn(Path(out))[0])
    keys = ["interpreter up", "job body starts", "first optimizer step"]
    rows = [[key, *common.spread([r[key] for r in runs], "{:.2f}")] for key in keys]
    rows.append(["peak RSS MiB at step 1", *common.spread([r["peak_rss_mb"] for r in runs], "{:.0f}")])
    title = f"Start-up of a training job, tiny model ({common.machine()}; {args.repeats} fresh processes)"
    common.save("startup", {"title": title, "runs": runs})
    common.print_table(title, ["seconds since process start", "median", "min-max"], rows)
    if args.importtime:
        with tempfile.TemporaryDirectory() as out:
            _, stderr = _spawn(Path(out), importtime=True)
        common.print_table(
            "Slowest imports of one start (-X importtime, inflates times)",
            ["s", "module"],
            top_imports(stderr),
        )


def _text_encoders(args: argparse.Namespace) -> None:
    """The cached run's start without its text encoders and with them loaded, alternated repeat by repeat
    (so a drift of the machine's load hits both alike)."""
    runs: dict[str, list[dict[str, float]]] = {"not loaded (now)": [], "all loaded at start (before)": []}
    for _ in range(args.repeats):
        for label, eager in zip(runs, (False, True), strict=True):
            with tempfile.TemporaryDirectory() as out:
                spawned = _spawn(Path(out), model=args.model, eager_text=eager, precision=args.precision)
                runs[label].append(spawned[0])
    rows = []
    for label, measured in runs.items():
        first = common.spread([r["first optimizer step"] for r in measured], "{:.2f}")
        rss = common.spread([r["peak_rss_mb"] for r in measured], "{:.0f}")
        rows.append([label, *first, *rss])
    title = (
        f"Start-up of a cached training job, {args.model}, mixed precision {args.precision}, text encoders "
        "loaded or not "
        f"({common.machine()}; {args.repeats} fresh processes each)"
    )
    common.save(f"startup_text_encoders_{args.model}_{args.precision}", {"title": title, "runs": runs})
    common.print_table(
        title,
        ["text encoders", "s to step 1, median", "min-max", "peak RSS MiB, median", "min-max"],
        rows,
    )


if __name__ == "__main__":
    main()
