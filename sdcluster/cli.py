"""The ``sdcluster`` command: one entry point over the package's commands (also ``python -m sdcluster``).

    sdcluster launch [-m] [+cluster=slurm] [KEY=VALUE ...]   # = python -m sdcluster.launch ...
    sdcluster generate [KEY=VALUE ...]                       # = sdcluster launch task=generate ...
    sdcluster logs [--cluster NAME] [JOB_ID]                 # every recent job and sweep, or one job's story
    sdcluster sweep list|report|resubmit
    sdcluster data prepare|validate DIR
    sdcluster models fetch TARGET | push RUN --repo OWNER/NAME
    sdcluster completion bash|zsh                            # a shell completion script

Each command hands its arguments to the module that already implements it (``sdcluster.launch``,
``sdcluster.logs``, ...), so the command and ``python -m sdcluster.<module>`` behave the same. ``launch``
goes through Hydra's own entry (``sdcluster.launch.run``) with ``sys.argv`` rewritten: composition,
multiruns and Hydra's flags (``--cfg job``, ``--info``, ``--hydra-help``...) are Hydra's, not a copy.
Imports stay inside the handlers: ``sdcluster --version`` and shell completion must not load Hydra or torch.
"""

from __future__ import annotations

import difflib
import sys
import textwrap
from collections.abc import Callable

from sdcluster import __version__

Handler = Callable[[list[str]], int]
_WIDTH = 110


def _launch(args: list[str]) -> int:
    if "--help" in args or "-h" in args:  # Hydra's own --help lists groups without saying what a key means
        print(launch_help())
        return 0
    if "--version" in args:  # Hydra's --version names Hydra alone
        import hydra

        print(f"sdcluster {__version__} (hydra-core {hydra.__version__})")
        return 0
    from sdcluster import launch

    sys.argv = [sys.argv[0], *args]  # hydra.main reads the command line from sys.argv, nowhere else
    launch.run()
    return 0


def _generate(args: list[str]) -> int:
    if args[:1] == ["merge"]:
        from sdcluster.generate.__main__ import main

        return main(args)
    if "--help" in args or "-h" in args:
        print(generate_help())
        return 0
    if any(arg.lstrip("+~").startswith("task=") for arg in args):
        print(
            "sdcluster: configuration error: task: `sdcluster generate` always runs task=generate. "
            "Fix: use `sdcluster launch task=...` for another task",
            file=sys.stderr,
        )
        return 2
    # Hydra's parser takes its overrides as one run of positionals: join the user's run, or end the line
    at = next((i for i, arg in enumerate(args) if "=" in arg and not arg.startswith("-")), len(args))
    return _launch([*args[:at], "task=generate", *args[at:]])


def _logs(args: list[str]) -> int:
    from sdcluster.logs import main

    return main(args, prog="sdcluster logs")


def _sweep(args: list[str]) -> int:
    from sdcluster.sweep.__main__ import main

    return main(args, prog="sdcluster sweep")


def _data(args: list[str]) -> int:
    from sdcluster.data.__main__ import main

    return main(args)


def _models(args: list[str]) -> int:
    from sdcluster.models.__main__ import main

    return main(args)


def _completion(args: list[str]) -> int:
    from sdcluster.completion import main

    return main(args)


COMMANDS: dict[str, tuple[Handler, str]] = {
    "launch": (_launch, "compose, check and submit a training or generation job (-m: a sweep)"),
    "generate": (
        _generate,
        "generate images (= launch task=generate); `generate merge FOLDER` re-merges shards",
    ),
    "logs": (_logs, "every recent job and sweep at a glance, or one job's state, attempts and log"),
    "sweep": (_sweep, "list your sweeps; report or resubmit the failed points of one"),
    "data": (_data, "prepare and validate a captioned image folder before submitting"),
    "models": (_models, "stage a hub model ahead of time (fetch); publish a finished run (push)"),
    "completion": (_completion, "print a bash or zsh completion script"),
}


def _wrap(text: str, indent: int) -> str:
    return textwrap.fill(text, _WIDTH, initial_indent=" " * indent, subsequent_indent=" " * indent)


def overall_help() -> str:
    width = max(len(name) for name in COMMANDS) + 2
    lines = [
        "usage: sdcluster [--version] [--help] COMMAND [ARGS ...]",
        "",
        "Fine-tune Stable Diffusion and mass-produce images as SLURM batch jobs.",
        "",
        "commands:",
        *(f"  {name:<{width}}{summary}" for name, (_, summary) in COMMANDS.items()),
        "",
        "`sdcluster COMMAND --help` says more; `sdcluster launch --help` lists every config key.",
    ]
    return "\n".join(lines)


def _key_lines(section_keys: tuple, indent: int = 4) -> list[str]:
    lines = []
    for key in section_keys:
        default = key.default if len(key.default) <= 60 else f"{key.default[:56]}...{key.default[-1]}"
        lines.append(f"{' ' * indent}{key.name}={default}  ({key.type})")
        lines.append(_wrap(key.doc.replace("``", "`"), indent + 4))
    return lines


def launch_help() -> str:
    """Usage, Hydra's flags, then each section of the config: its group options and its keys, each with the
    schema's docstring and default."""
    from sdcluster import schema_docs

    lines = [
        "usage: sdcluster launch [-m] [+cluster=slurm] [GROUP=OPTION ...] [KEY=VALUE ...] [HYDRA FLAGS]",
        "",
        "Compose the config (the package's conf/, then conf/local/ of this directory, then the command",
        "line), check it and submit; the same as `python -m sdcluster.launch`.",
        "",
        "  -m, --multirun     a sweep: comma-separated values (optim.lr=1e-5,5e-6) make one point each",
        "  --cfg job          print the composed config and stop (launch.dry_run=true: check, show jobs)",
        "  --hydra-help       Hydra's own flags (--info, --config-dir, --config-name...), all accepted here",
        "",
    ]
    sections = schema_docs.sections()
    used = {section.name for section in sections}
    bundles = [g for g in schema_docs.groups() if g not in used]  # experiment/, debug/: override bundles
    for group in bundles:
        lines.append(f"{group}=OPTION  (override bundles in conf/{group}/)")
        for option in schema_docs.group_options(group):
            lines.append(f"    {group}={option}")
            doc = schema_docs.option_doc(group, option)
            lines += [_wrap(doc, 8)] if doc else []
        lines.append("")
    for section in sections:
        title = section.name or "top level"
        lines.append(f"{title}: {section.doc.replace('``', '`')}")
        if section.options:
            plus = "+" if section.name == "cluster" else ""  # not in config.yaml's defaults: appended
            lines.append(f"  options: {plus}{section.name}={'|'.join(section.options)}")
        lines += _key_lines(section.keys)
        lines.append("")
    return "\n".join(lines).rstrip()


def generate_help() -> str:
    from sdcluster import schema_docs

    section = next(s for s in schema_docs.sections() if s.name == "generate")
    lines = [
        "usage: sdcluster generate [KEY=VALUE ...]    (= sdcluster launch task=generate ...)",
        "       sdcluster generate merge FOLDER     (merge a sharded run's manifest parts, redraw its sheet)",
        "",
        "Generates from generate.model (a pipeline folder or hub id) or from the run the config names.",
        "Every other key works too: `sdcluster launch --help` lists them all.",
        "",
        f"generate: {section.doc.replace('``', '`')}",
        *_key_lines(section.keys),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(overall_help())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"sdcluster {__version__}")
        return 0
    if args[0] == "__complete":  # what the completion scripts call on <Tab>
        from sdcluster.completion import complete_command

        return complete_command(args[1:], tuple(COMMANDS))
    if args[0] not in COMMANDS:
        guess = difflib.get_close_matches(args[0], COMMANDS, n=1)
        meant = f" Did you mean `sdcluster {guess[0]}`?" if guess else ""
        print(
            f"sdcluster: unknown command {args[0]!r}.{meant} Commands: {', '.join(COMMANDS)}", file=sys.stderr
        )
        return 2
    return COMMANDS[args[0]][0](args[1:])


def entry() -> None:
    """The console script: exit with the command's status."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `sdcluster launch --help | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python docs' recipe: no 2nd error
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    entry()
