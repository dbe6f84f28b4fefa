"""``sdcluster sweep list|report|resubmit`` (or ``python -m sdcluster.sweep``): a sweep after its submission.

sdcluster sweep list                                                       # your sweeps, newest first
python -m sdcluster.sweep report <sweep folder, sweep id or job id>              # table + CSV + loss plot
python -m sdcluster.sweep resubmit <sweep folder, sweep id or job id> --failed   # only the failed points
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdcluster.atomic import DiskFullError
from sdcluster.config import Config, ConfigError
from sdcluster.sweep.ledger import find


def main(argv: list[str] | None = None, prog: str = "python -m sdcluster.sweep") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0].replace("``", ""))
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="your sweeps: points, their states, best validation loss")
    report = commands.add_parser("report", help="table, CSV and loss plot of a sweep (works while running)")
    again = commands.add_parser("resubmit", help="resubmit points of a sweep")
    again.add_argument("--failed", action="store_true", required=True, help="only the failed points")
    for command in (report, again):
        command.add_argument("sweep", help="sweep folder, sweep id, or a job id of one of its points")
    for command in (listing, report, again):
        command.add_argument("--output-root", type=Path, default=Path(Config.output_root), help="output_root")
        command.add_argument("--jobs-root", type=Path, default=Path(Config.jobs_root), help="jobs_root")
    args = parser.parse_args(argv)
    if args.command == "list":
        from sdcluster.sweep.ledger import user_sweeps
        from sdcluster.sweep.report import list_sweeps

        print("\n".join(list_sweeps(user_sweeps(args.output_root, args.jobs_root))))
        return 0
    try:
        folder = find(args.sweep, args.output_root, args.jobs_root)
        if args.command == "resubmit":
            from sdcluster.sweep.points import resubmit_failed

            return resubmit_failed(folder)
        from sdcluster.sweep.report import report as make_report

        return make_report(folder)
    except ConfigError as err:
        print(f"sdcluster.sweep: {err}", file=sys.stderr)
        return 2
    except DiskFullError as err:  # explained already: one line, no traceback
        print(f"sdcluster.sweep: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
