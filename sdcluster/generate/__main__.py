"""``python -m sdcluster.generate merge FOLDER``: merge a sharded run's manifest parts, redraw its sheet.

The last shard to finish merges by itself; this is for a folder whose shards were run by hand or repaired.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sdcluster.generate import records
from sdcluster.generate.manifest_index import keys_in


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdcluster.generate", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="merge the shards' manifest parts and draw the contact sheet")
    merge.add_argument("folder", type=Path, help="a generation folder (holds manifest.parts/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        path = records.merge_image_manifest(args.folder)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    # streamed: 100,000 records are ~100 MB
    count = sum(1 for _ in records.stream_image_manifest(args.folder))
    on_disk = len(keys_in(args.folder))
    print(f"{count} records in {path} ({on_disk} images on disk)")
    print(f"contact sheet: {args.folder / records.CONTACT_SHEET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
