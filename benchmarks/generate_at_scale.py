"""Generation at scale: per-image overhead on `small`, a 16-shard array on the test cluster, merge cost.

    python -m benchmarks.generate_at_scale                        # all three parts, 100,000 images
    python -m benchmarks.generate_at_scale --parts overhead       # a) only (minutes)
    python -m benchmarks.generate_at_scale --parts array --images 10000   # b) at a smaller scale first
    python -m benchmarks.generate_at_scale --parts merge --merge-sizes 10000 100000   # c) only

Run as root on a machine with the SLURM sandbox's packages (``python -m tests.sandbox start``).

a) **Overhead share** on the ``small`` benchmark model (128 px, 20 steps, phash on): the generation job
   itself, with its own functions timed in place: ``render`` (the pipeline call) against everything else
   the job does per image (PNG encode + atomic write, record append, the perceptual hash, the skip and
   backfill checks). share = that overhead / the job's time without loading (and without the merge, which
   is once per run and measured in c).
b) **The array**: ``python -m sdcluster.launch +cluster=slurm task=generate generate.shards=16`` on the
   tiny model (64 px, 2 steps, guidance 1: affordable on a few CPU cores; the point is the bookkeeping),
   a prompt program of 100 prompts x N/100 images. Then: files on disk == manifest lines == metadata.jsonl
   lines == N with no name twice, the gallery is there; images/s of the whole array (first submit to the
   last task's end, from sacct); a re-merge by hand (``python -m sdcluster.generate merge``) timed in a
   child process with its peak RSS.
c) **Merge scaling**: folders of 10,000 and 100,000 records built from the array's images, thumbnails and
   records (hard links, renumbered records in 16 parts), each merged twice, each time in a fresh child:
   time and peak RSS, to show memory flat in the number of images.

Results: ``benchmarks/results/generate_at_scale.json`` and Markdown tables on stdout (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

SHARDS = 16
PROMPTS = 100  # the program: 10 colours x 10 things


def _program(path: Path, images: int) -> Path:
    per_prompt = max(1, images // PROMPTS)
    path.write_text(
        "slots:\n"
        "  colour: [red, orange, yellow, green, teal, blue, purple, pink, brown, grey]\n"
        "  thing: [jeans, jacket, shirt, hat, shoe, bag, scarf, glove, sock, belt]\n"
        "templates:\n"
        '  - text: "a {colour} {thing} on a white background"\n'
        f"    images: {per_prompt}\n"
    )
    return path


# ---------------------------------------------------------------- a) overhead share on `small`


class _Clock:
    """Seconds spent inside wrapped functions, by name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, module: Any, name: str, label: str) -> None:
        inner = getattr(module, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - started

        setattr(module, name, timed)


def overhead(images: int, batch_size: int) -> dict[str, Any]:
    """Part a), in this process: the job's own functions timed where the job calls them."""
    common.set_threads()
    from sdcluster.config import Config, GenerateConfig
    from sdcluster.generate import job, records, scores

    clock = _Clock()
    clock.wrap(job, "render", "render")
    clock.wrap(job, "load_pipeline", "load")
    clock.wrap(job, "save_png_atomic", "png encode + atomic write")
    clock.wrap(records, "append_record", "record append")
    clock.wrap(scores, "phash", "phash")
    clock.wrap(job, "is_done", "skip checks")
    clock.wrap(job, "_backfill_records", "backfill check")
    clock.wrap(records, "merge_image_manifest", "merge (once per run)")
    res = common.RESOLUTION["small"]
    with tempfile.TemporaryDirectory() as tmp:
        gen = GenerateConfig(
            prompts=[f"a pair of denim jeans, view {n}" for n in range(max(1, images // 8))],
            num_images=min(8, images),
            batch_size=batch_size,
            steps=20,
            height=res,
            width=res,
            model=str(common.model_path("small")),
        )
        cfg = Config(task="generate", output_root=tmp, jobs_root=f"{tmp}/jobs", generate=gen)
        started = time.perf_counter()
        made = job.generate_images(cfg).generated
        total = time.perf_counter() - started
    seconds = clock.seconds
    generation = total - seconds.get("load", 0.0) - seconds.get("merge (once per run)", 0.0)
    per_image = ["png encode + atomic write", "record append", "phash", "skip checks", "backfill check"]
    spent = sum(seconds.get(k, 0.0) for k in per_image)
    return {
        "images": made,
        "generation_s": generation,
        "seconds": seconds,
        "overhead_s": spent,
        "overhead_share": spent / generation,
        "images_per_s": made / generation,
    }


# ---------------------------------------------------------------- b) the array on the test cluster


def _sandbox_env() -> dict[str, str]:
    subprocess.run([sys.executable, "-m", "tests.sandbox", "start"], check=True)
    line = subprocess.run(
        [sys.executable, "-m", "tests.sandbox", "env"], check=True, capture_output=True, text=True
    ).stdout
    key, value = line.strip().removeprefix("export ").split("=", 1)
    return {**os.environ, key: value.strip("'\"")}


def launch_array(images: int, root: Path) -> tuple[Path, str]:
    """Submit through the real launch path; return the generation folder and the array's job id."""
    from sdcluster.models.embedded import ensure_tiny_model

    model = ensure_tiny_model(root / "cache")
    program = _program(root / "program.yaml", images)
    argv = [sys.executable, "-m", "sdcluster.launch", "+cluster=slurm", "task=generate"]
    # one CPU (and torch thread) a task: without it every task sizes its pool to the whole node, and the
    # tasks SLURM runs side by side oversubscribe the cores (measured: several times slower)
    argv += ["cluster.cpus_per_task=1", f"generate.model={model}", f"generate.shards={SHARDS}"]
    argv += ["generate.prompts=[]"]
    argv += [f"generate.prompts_file={program}", "generate.steps=2", "generate.guidance_scale=1.0"]
    argv += ["generate.batch_size=64", f"output_root={root / 'out'}", f"jobs_root={root / 'jobs'}"]
    argv += [f"cache_root={root / 'cache'}"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, env=_sandbox_env()).stdout
    folder = Path(next(s.split(":", 1)[1].strip() for s in out.splitlines() if s.startswith("images:")))
    job = next(s.split()[3] for s in out.splitlines() if s.startswith("submitted generate job"))
    return folder, job.split("_")[0]


def wait_for_array(job_id: str, poll_s: float = 30.0) -> dict[str, Any]:
    """Block until every task of the array has ended; its states and wall time (first submit to last end)."""
    env = _sandbox_env()
    fields = "JobID,State,Submit,Start,End"
    while True:
        rows = subprocess.run(
            ["sacct", "-j", job_id, "-X", "-n", "-P", f"--format={fields}"],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout.split()
        tasks = [dict(zip(fields.split(","), row.split("|"), strict=True)) for row in rows]
        ended = [t for t in tasks if t["End"] not in ("Unknown", "None", "")]
        if len(tasks) >= SHARDS and len(ended) == len(tasks):
            break
        time.sleep(poll_s)  # polling a scheduler: the array takes minutes to hours

    def epoch(stamp: str) -> float:
        return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))

    wall = max(epoch(t["End"]) for t in tasks) - min(epoch(t["Submit"]) for t in tasks)
    return {"states": sorted({t["State"] for t in tasks}), "wall_s": wall}


def check_folder(folder: Path) -> dict[str, Any]:
    """Every image once: files, manifest lines and metadata rows agree, no name twice, gallery there."""
    from sdcluster.generate import records

    files = [p.name for p in records.image_files(folder)]
    manifest = [r["file"] for r in records.stream_image_manifest(folder)]
    metadata = [json.loads(line)["file_name"] for line in (folder / "metadata.jsonl").open()]
    return {
        "files": len(files),
        "manifest_lines": len(manifest),
        "metadata_lines": len(metadata),
        "no_duplicates": len(set(manifest)) == len(manifest) and len(set(metadata)) == len(metadata),
        "same_sets": set(files) == set(manifest) == set(metadata),
        "gallery": (folder / "gallery" / "index.html").is_file(),
    }


def timed_merge(folder: Path) -> dict[str, float]:
    """``python -m sdcluster.generate merge FOLDER`` in a fresh child: its wall time and peak RSS."""
    return common.child_json(["benchmarks.generate_at_scale", "--merge-child", str(folder)])


def _merge_child(folder: Path) -> None:
    from sdcluster.generate.__main__ import main

    started = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            main(["merge", str(folder)])
        finally:
            sys.stdout = stdout
    print(json.dumps({"merge_s": time.perf_counter() - started, "peak_rss_mb": common.peak_rss_mb()}))


# ---------------------------------------------------------------- c) merge scaling


def build_folder(source: Path, dest: Path, count: int) -> Path:
    """``count`` records over the images of ``source`` (hard links, thumbnails too), renumbered 100 images a
    prompt, in :data:`SHARDS` parts; the source's settings, so a merge by hand applies the same filter."""
    from sdcluster.generate import records

    real = list(records.stream_image_manifest(source))
    thumbs = source / "gallery" / "thumbs"
    (dest / "gallery" / "thumbs").mkdir(parents=True)
    (dest / records.SETTINGS).write_bytes((source / records.SETTINGS).read_bytes())
    (dest / records.PARTS_DIR).mkdir()
    per_part = -(-count // SHARDS)
    for shard in range(SHARDS):
        lines = []
        for n in range(shard * per_part, min(count, (shard + 1) * per_part)):
            record = dict(real[n % len(real)])
            p, i = divmod(n, 100)
            name = records.image_name(p, i)
            os.link(source / record["file"], dest / name)
            # the source's thumbnails too: making 100,000 JPEGs is the array's merge's work, not a re-merge's
            thumb = f"{Path(record['file']).stem}.jpg"
            os.link(thumbs / thumb, dest / "gallery" / "thumbs" / f"{Path(name).stem}.jpg")
            record.update(file=name, prompt_index=p, image_index=i)
            lines.append(json.dumps(record) + "\n")
        records.part_path(dest, shard, SHARDS).write_text("".join(lines))
    return dest


def merge_scaling(source: Path, sizes: list[int], root: Path) -> list[dict[str, Any]]:
    rows = []
    for count in sizes:
        folder = build_folder(source, root / f"merge-{count}", count)
        first = timed_merge(folder)  # the first manifest, metadata and gallery pages of this folder
        again = timed_merge(folder)
        checked = check_folder(folder)
        rows.append({"records": count, "first_merge": first, "re_merge": again, "check": checked})
        print(f"merge of {count}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def near_duplicate_time(count: int, distance: int = 4) -> float:
    """Seconds to find the near-duplicates among ``count`` random hashes (the filter's rule)."""
    import random

    from sdcluster.generate.scores import near_duplicates

    rng = random.Random(0)
    rows = [{"file": f"f{n}", "scores": {"phash": f"{rng.getrandbits(64):016x}"}} for n in range(count)]
    started = time.perf_counter()
    near_duplicates(rows, distance)
    return time.perf_counter() - started


# ---------------------------------------------------------------- the tables


def _tables(result: dict[str, Any]) -> None:
    machine = result["machine"]
    if "overhead" in result:
        o = result["overhead"]
        once = ("load", "merge (once per run)")  # outside the generation time the share is taken of
        rows = [
            [k, f"{v:.2f}", "once, not counted" if k in once else f"{100 * v / o['generation_s']:.2f}%"]
            for k, v in o["seconds"].items()
        ]
        rows.append(
            [
                "per-image overhead (png, record, phash, checks)",
                f"{o['overhead_s']:.2f}",
                f"**{100 * o['overhead_share']:.2f}%**",
            ]
        )
        title = f"Per-image overhead, small model, {o['images']} images, 20 steps ({machine})"
        common.print_table(title, ["part of the job", "seconds", "share of generation"], rows)
    if result.get("arrays"):
        rows = []
        for a in result["arrays"].values():
            c, m = a["check"], a["re_merge"]
            counts = f"{c['files']} / {c['manifest_lines']} / {c['metadata_lines']}"
            once = "yes" if c["no_duplicates"] and c["same_sets"] else "NO"
            rate = a["images"] / a["wall_s"]
            rows.append(
                [
                    a["images"],
                    SHARDS,
                    f"{a['wall_s']:.0f}",
                    f"{rate:.1f}",
                    counts,
                    once,
                    "yes" if c["gallery"] else "NO",
                    f"{m['merge_s']:.1f}",
                    f"{m['peak_rss_mb']:.0f}",
                ]
            )
        header = [
            "images",
            "shards",
            "array wall s",
            "images/s",
            "files / manifest / metadata",
            "each once",
            "gallery",
            "re-merge s",
            "re-merge peak RSS MiB",
        ]
        title = "Sharded array, tiny model 64 px, 2 steps, guidance 1, batch 64, 1 CPU a task, test cluster"
        common.print_table(f"{title} ({machine})", header, rows)
    if "merge" in result:
        rows = [
            [
                r["records"],
                f"{r['first_merge']['merge_s']:.1f}",
                f"{r['re_merge']['merge_s']:.1f}",
                f"{r['re_merge']['peak_rss_mb']:.0f}",
                "yes" if r["check"]["same_sets"] else "NO",
            ]
            for r in result["merge"]
        ]
        rows.append(
            [
                f"near-duplicates of {result['near_dup_n']} hashes (d=4)",
                f"{result['near_dup_s']:.1f}",
                "",
                "",
                "",
            ]
        )
        header = [
            "records",
            "first merge s",
            "re-merge s",
            "re-merge peak RSS MiB",
            "each once",
        ]
        common.print_table(f"Merge scaling, records from the array's images ({machine})", header, rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts", nargs="+", default=["overhead", "array", "merge"], choices=["overhead", "array", "merge"]
    )
    parser.add_argument("--images", type=int, default=100_000, help="b) images in the array")
    parser.add_argument("--overhead-images", type=int, default=32)
    parser.add_argument("--merge-sizes", nargs="+", type=int, default=[10_000, 100_000])
    parser.add_argument("--root", type=Path, help="where folders go (default: a new temporary folder)")
    parser.add_argument("--job-id", help="b) measure this finished array instead of launching one")
    parser.add_argument("--folder", type=Path, help="the array's generation folder (with --job-id)")
    parser.add_argument("--merge-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.merge_child:
        _merge_child(args.merge_child)
        return
    root = args.root or Path(tempfile.mkdtemp(prefix="generate-at-scale-"))
    fresh: dict[str, Any] = {"machine": common.machine()}
    if "overhead" in args.parts:
        fresh["overhead"] = overhead(args.overhead_images, batch_size=8)
    folder = args.folder
    if "array" in args.parts:
        if args.job_id is None:
            folder, job_id = launch_array(args.images, root)
        else:
            job_id = args.job_id
        state = wait_for_array(job_id)
        checked = check_folder(folder)
        entry = {"images": checked["manifest_lines"], "job_id": job_id, "folder": str(folder), **state}
        fresh["array"] = entry | {"check": checked, "re_merge": timed_merge(folder)}
    if "merge" in args.parts:
        if folder is None:
            raise SystemExit("--parts merge needs the array's folder: run part b) too, or pass --folder")
        fresh["merge"] = merge_scaling(folder, args.merge_sizes, root)
        fresh["near_dup_n"] = max(args.merge_sizes)
        fresh["near_dup_s"] = near_duplicate_time(fresh["near_dup_n"])
    # Read back just before saving: parts run at different times (an array takes hours) share one file.
    saved = Path(__file__).resolve().parent / "results" / "generate_at_scale.json"
    result: dict[str, Any] = json.loads(saved.read_text()) if saved.is_file() else {}
    if "array" in fresh:
        array = fresh.pop("array")
        result.setdefault("arrays", {})[str(array["images"])] = array
    result.update(fresh)
    common.save("generate_at_scale", result)
    _tables(result)


if __name__ == "__main__":
    main()
