"""Prepare and check a captioned image folder before a job is submitted.

Run it on the login node before submitting: a bad line or a corrupt image then costs seconds, not a
queue wait and a failed job.

    python -m sdcluster.data prepare DIR                     # list every image in DIR/metadata.jsonl
    python -m sdcluster.data validate DIR [--max-pixels N]   # every problem, one per line; exit 1 if any
    python -m sdcluster.data validate DIR --buckets 1024     # and how many images go to each bucket
    python -m sdcluster.data validate data=sources [OVERRIDES...]  # every source of data.sources, by name
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdcluster.data.metadata import METADATA_FILE, MetadataError, prepare, validate


def _prepare(args: argparse.Namespace) -> int:
    try:
        report = prepare(args.dir, caption_column=args.caption_column)
    except (MetadataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    action = "wrote" if report.written else "unchanged"
    print(f"{report.path}: {report.entries} entries ({len(report.added)} added, {action})")
    for name in report.missing_file:
        print(f"image missing (caption kept): {name}")
    for name in report.bad_name:
        print(f"not listed, its name is not valid UTF-8 (rename the file): {name!a}")
    for name in report.missing_caption:
        print(f"needs a caption: {name}")
    if report.missing_caption:
        count, key = len(report.missing_caption), args.caption_column
        print(f'write the {count} missing "{key}" values in {METADATA_FILE}, then run validate')
    return 0


def _validate_sources(args: argparse.Namespace) -> int:
    """``validate`` with launch's overrides: every source of ``data.sources`` (or the one folder), each
    problem named by its source, as launch's preflight names it."""
    from sdcluster.compose import compose
    from sdcluster.config import ConfigError
    from sdcluster.data.reader import scan
    from sdcluster.data.sources import source_problems, sources_of, unstaged

    try:
        cfg = compose([args.dir, *args.overrides])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    staged_at_launch = "launch stages a hub dataset and checks it then (its access, split and columns); "
    staged_at_launch += "a dry run checks the same without downloading: python -m sdcluster.launch "
    staged_at_launch += "launch.dry_run=true with these overrides"
    if cfg.data.hub and not (cfg.data.path and Path(cfg.data.path).is_dir()):
        spec = f"data=hub data.name={cfg.data.name}"
        print(f"error: {spec}: no folder here to check; {staged_at_launch}", file=sys.stderr)
        return 2
    if not cfg.data.sources:  # one folder: what `validate DIR` says
        args.dir, args.overrides = cfg.data.path, []
        args.caption_column, args.max_pixels = cfg.data.caption_column, cfg.data.max_pixels
        return _validate(args)
    problems = source_problems(cfg)
    for label, problem in problems:
        print(f"{label}: {problem}")
    if problems:
        print(f"{len(problems)} problem(s) in data.sources", file=sys.stderr)
        return 1
    waiting = unstaged(cfg)  # in the list's order
    for label in waiting:
        print(f"not checked: {label}: {staged_at_launch}")
    here = [(i, s) for i, s in enumerate(sources_of(cfg.data)) if s.label(i) not in waiting]
    for index, source in here:
        count = len(scan(Path(source.path), source.caption_column)[0])
        print(f"OK: {source.label(index)}: {count} images x {source.repeats} repeats")
    return 0


def _validate(args: argparse.Namespace) -> int:
    if ("=" in args.dir and not Path(args.dir).is_dir()) or args.overrides:  # launch's overrides
        return _validate_sources(args)
    problems = validate(args.dir, max_pixels=args.max_pixels, caption_column=args.caption_column)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s) in {args.dir}", file=sys.stderr)
        return 1
    from sdcluster.data.metadata import read_metadata

    print(f"OK: {len(read_metadata(args.dir))} images")
    if args.buckets is not None:
        return _bucket_histogram(args)
    return 0


def _bucket_histogram(args: argparse.Namespace) -> int:
    """The images per aspect-ratio bucket, as ``data.buckets`` with these settings would train them."""
    from sdcluster.config import ConfigError
    from sdcluster.config.data import BucketConfig
    from sdcluster.data.buckets import histogram_lines, make_buckets, upright_size
    from sdcluster.data.reader import scan

    try:
        settings = BucketConfig(True, args.buckets, args.bucket_step, args.bucket_max_aspect)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows, _ = scan(Path(args.dir), args.caption_column)
    sizes = [upright_size(Path(args.dir) / row.file_name) for row in rows]
    buckets = make_buckets(args.buckets, settings.step, settings.max_aspect)
    print("\n".join(histogram_lines(sizes, buckets, args.batch)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdcluster.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("prepare", _prepare, "write or update metadata.jsonl, keeping captions already written"),
        ("validate", _validate, "report every problem of the folder; exit 1 if there is any"),
    ):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("dir", help="the image folder (images + metadata.jsonl)")
        cmd.add_argument("--caption-column", default="text", help="the caption key (data.caption_column)")
        cmd.set_defaults(func=func)
    validate_cmd = sub.choices["validate"]
    validate_cmd.add_argument(
        "overrides",
        nargs="*",
        help="with DIR an override (data=sources ...): the launch's overrides; every source is checked",
    )
    validate_cmd.add_argument(
        "--max-pixels", type=int, default=40_000_000, help="largest width*height accepted (data.max_pixels)"
    )
    validate_cmd.add_argument(
        "--buckets",
        type=int,
        metavar="SIDE",
        help="also count the images of each aspect-ratio bucket of about SIDE x SIDE pixels "
        "(data.buckets.enabled=true data.buckets.side=SIDE; usually train.resolution)",
    )
    validate_cmd.add_argument("--bucket-step", type=int, default=64, help="data.buckets.step")
    validate_cmd.add_argument("--bucket-max-aspect", type=float, default=2.0, help="data.buckets.max_aspect")
    validate_cmd.add_argument(
        "--batch", type=int, default=1, help="the global batch, to flag buckets with fewer images than it"
    )
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
