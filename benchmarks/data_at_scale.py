"""1,000, 10,000 and 100,000 images: validate, build the latent cache as an array, start training.

    python -m benchmarks.data_at_scale                              # makes 100,000 images, then all sizes
    python -m benchmarks.data_at_scale --sizes 1000 10000 --root /tmp/scale   # smaller first; keeps --root

The dataset is made by sdcluster itself: ``task=generate`` on the tiny model (64 px, 2 steps, guidance 1,
a program of 100 prompts: the point is the bookkeeping, not the pictures) writes a folder with its
``metadata.jsonl``; the smaller sizes are its first N images (hard links and the first N metadata lines).
For each size, each step a fresh process, as a user runs it:

1. ``python -m sdcluster.data validate DIR``: wall time (it decodes every image, over the CPUs it has);
   then, after the cache's build, ``python -m sdcluster.launch launch.dry_run=true`` twice: a launch's checks
   before the queue, decoding every image the first time (no memo) and only the new or changed ones the
   second (with the memo the cache build's launch recorded).
2. ``python -m sdcluster.launch task=cache data.cache_shards=S``: the latent cache as an array of S tasks
   (the local executor runs them one after another, so per-process throughput is what it measures):
   encoded rows per second of one process (from the pieces' own log lines), the entry's bytes per image.
3. The data pinned as a launch that submits pins it after its check (``data.snapshot``,
   sdcluster/data/snapshot.py): the seconds it adds to the check.
4. A training job's start on the built cache with that pin in its config (as a launched job has it),
   twice with the entry in RAM (the default budget) and twice memory-mapped (``data.cache_memory_mb=0``,
   the setting for entries beyond the budget): seconds from process start to its first optimizer step,
   and the peak RSS at that step (the second of each pair).

Results: ``benchmarks/results/data_at_scale.json`` and a Markdown table on stdout (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import common

PROMPTS = 100
SHARDS = 4


def _launch(argv: list[str], root: Path) -> str:
    cmd = [sys.executable, "-m", "sdcluster.launch", *argv]
    cmd += [f"output_root={root / 'out'}", f"jobs_root={root / 'jobs'}", f"cache_root={root / 'cache'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def make_dataset(images: int, root: Path) -> Path:
    """``images`` generated images with their metadata.jsonl (generation's own output folder)."""
    from sdcluster.models.embedded import ensure_tiny_model

    model = ensure_tiny_model(root / "cache")
    program = root / "program.yaml"
    program.write_text(
        "slots:\n"
        "  colour: [red, orange, yellow, green, teal, blue, purple, pink, brown, grey]\n"
        "  thing: [jeans, jacket, shirt, hat, shoe, bag, scarf, glove, sock, belt]\n"
        "templates:\n"
        '  - text: "a {colour} {thing} on a white background"\n'
        f"    images: {max(1, images // PROMPTS)}\n"
    )
    out = _launch(
        [
            "task=generate",
            f"generate.model={model}",
            "generate.prompts=[]",
            f"generate.prompts_file={program}",
            "generate.steps=2",
            "generate.guidance_scale=1.0",
            "generate.batch_size=64",
            "generate.scores.phash=false",
        ],
        root,
    )
    return Path(next(s.split(":", 1)[1].strip() for s in out.splitlines() if s.startswith("images:")))


def subset(full: Path, images: int, dest: Path) -> Path:
    """The first ``images`` rows of ``full`` as a folder of their own (hard links: no pixel copied)."""
    if (dest / "metadata.jsonl").is_file():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    lines = (full / "metadata.jsonl").read_text().splitlines()[:images]
    for line in lines:
        name = json.loads(line)["file_name"]
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        if not (dest / name).exists():
            os.link(full / name, dest / name)
    (dest / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return dest


def timed_validate(folder: Path) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "sdcluster.data", "validate", str(folder)], check=True, capture_output=True
    )
    return time.perf_counter() - started


def timed_launch_checks(folder: Path, root: Path) -> list[float]:
    """``launch.dry_run=true`` of a training job twice, each a fresh process: every check a launch makes
    before the queue. The first without the memo of the images that decoded cleanly (moved aside: every
    image is decoded), the second with it (:class:`sdcluster.data.file_facts.DecodedMemo`, which the cache
    build's launch recorded: a dry run only reads it), as every launch after the first finds it."""
    memos = list((root / "cache" / "image_facts").glob("*.decoded.json"))
    assert memos, "the cache build's launch records the memo"

    def dry_run() -> float:
        started = time.perf_counter()
        _launch(["task=train", f"data.path={folder}", "launch.dry_run=true"], root)
        return time.perf_counter() - started

    for memo in memos:
        memo.rename(memo.with_suffix(".aside"))
    first = dry_run()
    for memo in memos:
        memo.with_suffix(".aside").rename(memo)
    return [first, dry_run()]


def cache_build(folder: Path, root: Path) -> dict[str, Any]:
    """task=cache over SHARDS tasks; rows/s of each piece (its log's first and last progress line)."""
    started = time.perf_counter()
    out = _launch(["task=cache", f"data.path={folder}", f"data.cache_shards={SHARDS}"], root)
    wall = time.perf_counter() - started
    jobs = [
        line.split()[3].rstrip(":") for line in out.splitlines() if line.startswith("submitted cache job")
    ]
    rates, entry = [], None
    for job in jobs:
        text = next((root / "jobs" / job).glob("*_0_log.out")).read_text()
        done = re.search(r"piece \d+ of \d+ encoded: \d+ rows in [\d.]+ s \(([\d.]+) rows/s", text)
        if done:
            rates.append(float(done[1]))
        found = re.search(r"published (\S+)", text)
        entry = Path(found[1]) if found else entry
    assert entry is not None, out
    manifest = json.loads((entry / "manifest.json").read_text())
    size = sum(f["bytes"] for f in manifest["files"].values()) + (entry / "manifest.json").stat().st_size
    images = len(manifest["sizes"])
    return {
        "wall_s": wall,
        "rows_per_s_per_process": sorted(rates),
        "rows": len(manifest["variants"]),
        "images": images,
        "bytes_per_image": size / images,
        "manifest_bytes": (entry / "manifest.json").stat().st_size,
    }


def child(started: float, folder: Path, root: Path, extra: list[str]) -> None:
    """The measured process: a training job on ``folder`` that stops after its first optimizer step."""
    from sdcluster.compose import compose
    from sdcluster.runtime import callables

    marks = {"interpreter up": time.time() - started}
    cfg = compose(
        [
            "task=train",
            f"data.path={folder}",
            "train.max_steps=40",
            f"output_root={root / 'out'}",
            f"jobs_root={root / 'jobs'}",
            f"cache_root={root / 'cache'}",
            *extra,
        ]
    )

    def body(cfg, flag, dist):
        from sdcluster.runtime.step_events import stop_at
        from sdcluster.train.loop import train

        def first_step(step: int) -> bool:
            marks["first optimizer step"] = time.time() - started
            return True

        with stop_at(first_step):
            result = train(cfg, flag=flag)
        return callables.Outcome(False, result.step)

    callables.run_job(cfg, "train", body)
    print(json.dumps({**marks, "peak_rss_mb": common.peak_rss_mb()}))


def pin_child(folder: Path, root: Path) -> None:
    """The measured process of :func:`pin`: what a launch that submits adds to its data check (the pin,
    ``data.snapshot``, from the rows the check read)."""
    from sdcluster.cluster.preflight import check_data
    from sdcluster.compose import compose
    from sdcluster.data import snapshot

    cfg = compose(["task=train", f"data.path={folder}", f"cache_root={root / 'cache'}"])
    rows = check_data(cfg)  # as the launch checks first
    started = time.perf_counter()
    pinned = snapshot.pin(cfg, [rows], say=lambda line: None)
    print(json.dumps({"digest": pinned.data.snapshot, "pin_s": time.perf_counter() - started}))


def pin(folder: Path, root: Path) -> dict[str, Any]:
    """Pin ``folder`` as a launch that submits does, in a fresh process (after the launch that queued the
    cache build recorded its decoded-images memo, and the build filled the facts index): its seconds and
    the digest the measured starts carry, as a launched job's config does."""
    cmd = [sys.executable, "-m", "benchmarks.data_at_scale", "--pin", str(folder), "--root", str(root)]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def start(folder: Path, root: Path, n: int, extra: list[str] | None = None) -> dict[str, float]:
    started = time.time()
    cmd = [sys.executable, "-m", "benchmarks.data_at_scale", "--child", str(folder), "--root", str(root)]
    cmd += ["--started", repr(started), *[f"--override={o}" for o in extra or []]]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    (root / f"start-{n}{'-'.join(['', *(extra or [])])}.log").write_text(proc.stdout + proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--root", type=Path, default=Path("/tmp/sdcluster-data-at-scale"))
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--pin", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument(
        "--remeasure",
        action="store_true",
        help="validate and start again on what a full run left in --root, keeping its cache-build numbers",
    )
    parser.add_argument(
        "--launch-checks", action="store_true", help="with --remeasure: only the launch's checks again"
    )
    args = parser.parse_args(argv)
    root = args.root
    if args.child:
        child(args.started, args.child, root, args.override)
        return
    if args.pin:
        pin_child(args.pin, root)
        return
    if args.remeasure:
        remeasure(args.sizes, root, only_launch=args.launch_checks)
        return
    root.mkdir(parents=True, exist_ok=True)
    made = root / "made.json"
    if made.is_file() and json.loads(made.read_text())["images"] >= max(args.sizes):
        record = json.loads(made.read_text())
    else:
        began = time.perf_counter()
        full = make_dataset(max(args.sizes), root / "gen")
        record = {"folder": str(full), "images": max(args.sizes), "generate_s": time.perf_counter() - began}
        made.write_text(json.dumps(record))
    full = Path(record["folder"])
    results: dict[str, Any] = {"machine": common.machine(), "generate": record, "sizes": {}}
    for n in sorted(args.sizes):
        folder = subset(full, n, root / f"data-{n}")
        size_root = root / f"run-{n}"
        entry: dict[str, Any] = {"validate_s": timed_validate(folder)}
        entry["cache"] = cache_build(folder, size_root)
        entry["launch_check_s"] = timed_launch_checks(folder, size_root)
        starts(entry, folder, size_root, n)
        results["sizes"][n] = entry
        print(json.dumps({n: entry}), file=sys.stderr, flush=True)
    common.save("data_at_scale", results)
    table(json.loads(json.dumps(results)))


def starts(entry: dict[str, Any], folder: Path, root: Path, n: int) -> None:
    """Two starts with the entry in RAM and two memory-mapped, each of a job launched on the pinned data
    (``data.snapshot``, as a launch that submits sets it), into ``entry``; and the pin's seconds."""
    pinned = pin(folder, root)
    entry["pin_s"] = pinned["pin_s"]
    snap = f"data.snapshot={pinned['digest']}"
    entry["starts"] = [start(folder, root, n, [snap]) for _ in range(2)]
    entry["mapped_starts"] = [start(folder, root, n, [snap, "data.cache_memory_mb=0"]) for _ in range(2)]


def remeasure(sizes: list[int], root: Path, only_launch: bool = False) -> None:
    """Validate, the launch's checks and the starts again on the datasets and caches a full run left in
    ``root`` (after a change to the start path), keeping that run's generation and cache-build numbers;
    ``only_launch``: the launch's checks alone. The table as :func:`main`."""
    path = Path(__file__).resolve().parent / "results" / "data_at_scale.json"
    results = json.loads(path.read_text())
    results["machine"] = common.machine()
    for n in sorted(sizes):
        entry = results["sizes"][str(n)]
        folder, size_root = root / f"data-{n}", root / f"run-{n}"
        entry["launch_check_s"] = timed_launch_checks(folder, size_root)
        if only_launch:
            continue
        entry["validate_s"] = timed_validate(folder)
        starts(entry, folder, size_root, n)
        print(json.dumps({n: entry}), file=sys.stderr, flush=True)
    common.save("data_at_scale", results)
    table(results)


def table(results: dict[str, Any]) -> None:
    rows = []
    for n, entry in sorted(results["sizes"].items(), key=lambda item: int(item[0])):
        cache, ram = entry["cache"], entry["starts"][-1]
        mapped = entry.get("mapped_starts", [{}])[-1]
        rates = cache["rows_per_s_per_process"]
        rows.append(
            [
                f"{int(n):,}",
                f"{entry['validate_s']:.1f}",
                "{:.1f} / {:.1f}".format(*entry["launch_check_s"]) if "launch_check_s" in entry else "-",
                f"{entry['pin_s']:.1f}" if "pin_s" in entry else "-",
                f"{min(rates):.0f}-{max(rates):.0f}" if rates else "?",
                f"{cache['wall_s']:.0f}",
                f"{cache['bytes_per_image'] / 1024:.1f}",
                f"{ram['first optimizer step']:.1f} / {ram['peak_rss_mb']:.0f}",
                f"{mapped['first optimizer step']:.1f} / {mapped['peak_rss_mb']:.0f}" if mapped else "-",
            ]
        )
    common.print_table(
        f"Data at scale, tiny model at 64 px ({results['machine']})",
        [
            "images",
            "validate s",
            "launch check s (first / again)",
            "pin s",
            f"cache rows/s per process ({SHARDS} pieces)",
            "cache build wall s",
            "cache KiB per image",
            "start to step 1 s / peak RSS MiB (cache in RAM)",
            "same, memory-mapped",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
