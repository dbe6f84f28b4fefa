"""``python -m tests.sandbox start|stop|status|env``: see the package's docstring."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import tests.sandbox as package
from tests.sandbox.daemons import _run
from tests.sandbox.lifecycle import is_running, resolve_dir, start, stop
from tests.sandbox.spec import DEFAULT_DIR, SandboxError


def main(argv: list[str] | None = None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", type=Path, default=None, help=f"state dir (default: {DEFAULT_DIR})")
    common.add_argument(
        "--nodes", type=int, default=1, help="nodes; more than 1: one network namespace each (default 1)"
    )
    parser = argparse.ArgumentParser(
        prog="python -m tests.sandbox",
        description=package.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    commands = {
        "start": "start or reuse the sandbox",
        "stop": "stop its daemons",
        "status": "print sinfo",
        "env": "print the line that exports SLURM_CONF",
    }
    for name, help_ in commands.items():
        sub.add_parser(name, parents=[common], help=help_)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    d = resolve_dir(args.dir, args.nodes)
    if args.cmd == "start":
        try:
            start(d, args.nodes)
        except SandboxError as err:
            print(err, file=sys.stderr)
            return 1
    elif args.cmd == "stop":
        stop(d, args.nodes)
    elif args.cmd == "env":
        print(f"export SLURM_CONF={shlex.quote(str(d / 'slurm.conf'))}")
    elif not is_running(d):
        print(f"SLURM sandbox in {d} is not running", file=sys.stderr)
        return 1
    else:
        print(_run(d, "sinfo").stdout, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
