"""Shell completion for ``sdcluster``: ``sdcluster completion bash|zsh`` prints a script to source.

The script asks ``sdcluster __complete SHELL WORDBREAKS LINE`` on every <Tab>, so what it offers always
matches the installed schema and ``conf/``: commands, config keys level by level (``optim.`` ->
``optim.lr=``...), each group's options (``model=`` -> ``model=sd15``...), ``true``/``false`` for a boolean
key, job ids for ``logs``. Hydra's own ``--shell-completion`` cannot serve: it completes ``python`` commands
through ``-m`` only in shells that complete the interpreter's arguments, and knows no key's meaning.

Candidates are printed one a line; one that ends in a space is a finished word, the others (``optim.``,
``optim.lr=``) go on. Bash splits words at ``=`` and ``:`` (``COMP_WORDBREAKS``), so for bash each candidate
loses what precedes the last such character of the word typed so far: bash replaces only that part.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys

from sdcluster import schema_docs

HYDRA_FLAGS = ("-m", "--multirun", "--cfg", "--resolve", "--info", "--help", "--hydra-help", "--version")
SUBCOMMANDS = {
    "sweep": ("list", "report", "resubmit"),
    "data": ("prepare", "validate"),
    "models": ("fetch", "push"),
    "completion": ("bash", "zsh"),
    "generate": ("merge",),
}
FLAGS = {
    "logs": ("--follow", "--task", "--err", "--jobs-root", "--cluster", "--help"),
    "sweep": ("--output-root", "--jobs-root", "--failed", "--help"),
    "data": ("--caption-column", "--max-pixels", "--help"),
}
APPENDED = ("cluster",)
"""Groups chosen with ``+group=option`` (not in ``conf/config.yaml``'s defaults list)."""

BASH = """\
# sdcluster completion for bash: eval "$(sdcluster completion bash)" in ~/.bashrc
_sdcluster() {{
    local line
    if [[ -n "${{COMP_LINE+set}}" ]]; then
        line="${{COMP_LINE:0:COMP_POINT}}"
    else
        line="${{COMP_WORDS[*]:0:COMP_CWORD+1}}"
    fi
    local IFS=$'\\n'
    COMPREPLY=($({command} __complete bash "$COMP_WORDBREAKS" "$line" 2>/dev/null))
}}
complete -o nospace -o default -F _sdcluster sdcluster
"""

ZSH = """\
#compdef sdcluster
# sdcluster completion for zsh: eval "$(sdcluster completion zsh)" in ~/.zshrc (after compinit)
_sdcluster() {{
    local -a found finished going
    local c
    found=("${{(@f)$({command} __complete zsh '' "${{(j: :)words[1,CURRENT]}}" 2>/dev/null)}}")
    for c in "${{found[@]}}"; do
        [[ -z $c ]] && continue
        if [[ $c == *' ' ]]; then finished+=("${{c% }}"); else going+=("$c"); fi
    done
    (( ${{#finished}} )) && compadd -- "${{finished[@]}}"
    (( ${{#going}} )) && compadd -S '' -- "${{going[@]}}"
    (( ${{#finished}} + ${{#going}} )) || _files
}}
(( $+functions[compdef] )) || {{ autoload -Uz compinit && compinit }}
compdef _sdcluster sdcluster
"""


def script(shell: str) -> str:
    """The completion script; it calls this interpreter, so it works without activating the environment
    (regenerate it after moving the environment)."""
    command = f"{shlex.quote(sys.executable)} -m sdcluster"
    return {"bash": BASH, "zsh": ZSH}[shell].format(command=command)


def _node_children(path: str) -> list[str]:
    """Children of a config node (``""``: the root; ``train``; ``train.lora``): leaves as ``name=``, nodes
    as ``name.``; the root also lists the config groups chosen with ``name=`` (not the appended ones)."""
    schema: type = schema_docs.Config
    for part in filter(None, path.split(".")):
        field = next((f for f in dataclasses.fields(schema) if f.name == part), None)
        default = schema_docs.default_of(field) if field else None
        if not dataclasses.is_dataclass(default):
            return []
        schema = type(default)
    prefix = f"{path}." if path else ""
    out = []
    for f in dataclasses.fields(schema):
        nested = dataclasses.is_dataclass(schema_docs.default_of(f))
        out.append(f"{prefix}{f.name}{'.' if nested else '='}")
    if not path:
        out += [f"{group}=" for group in schema_docs.groups() if group not in APPENDED]
    return out


def _values(name: str) -> list[str]:
    """Values of ``name=``: a group's options, or true/false (and null) for a boolean key."""
    group = name.lstrip("+")
    if group in schema_docs.groups():
        return [f"{name}={option} " for option in schema_docs.group_options(group)]
    key = next((k for k in schema_docs.leaf_keys() if k.name == name), None)
    if key and key.type.startswith("bool"):
        return [f"{name}={v} " for v in ("true", "false", *(["null"] if "None" in key.type else []))]
    return []


def overrides(current: str) -> list[str]:
    """Candidates for a ``launch`` argument being typed: a key (level by level), a group, or a value."""
    if current.startswith("-"):
        return [f"{flag} " for flag in HYDRA_FLAGS]
    if "=" in current:
        return _values(current.split("=", 1)[0])
    plus = current[: len(current) - len(current.lstrip("+~"))]
    path = current[len(plus) :].rpartition(".")[0]
    appended = [f"+{group}=" for group in APPENDED] if not path else []
    if plus:  # `+` appends a group (+cluster=slurm); a schema key already exists and takes no `+`
        return appended
    return sorted(set(_node_children(path))) + appended


def _job_ids() -> list[str]:
    from sdcluster.cluster import records

    return [f"{job_id} " for job_id, _ in records.indexed_jobs()]


def _clusters() -> list[str]:
    """The clusters of the user's indexed jobs, for ``logs --cluster``."""
    from sdcluster.cluster import records

    return sorted({f"{e.cluster} " for e in records.index_entries() if e.cluster})


def candidates(words: list[str], current: str, commands: tuple[str, ...]) -> list[str]:
    """What may follow ``sdcluster WORDS...`` where the word typed so far is ``current``; ``commands`` are
    the command line's own (:data:`sdcluster.cli.COMMANDS`, handed down: this module sits below it)."""
    if not words:
        return [f"{c} " for c in (*commands, "--help", "--version")]
    command, rest = words[0], words[1:]
    if command in ("launch", "generate") and not (command == "generate" and rest[:1] == ["merge"]):
        first = [f"{s} " for s in SUBCOMMANDS.get(command, ())] if not rest else []
        found = overrides(current)
        return first + (found if command == "launch" else [c for c in found if c != "task="])
    if current.startswith("-"):
        return [f"{flag} " for flag in FLAGS.get(command, ("--help",))]
    if command == "logs" and rest[-1:] == ["--cluster"]:
        return _clusters()
    if command in SUBCOMMANDS and not rest:
        return [f"{s} " for s in SUBCOMMANDS[command]]
    if command == "models" and rest[:1] == ["fetch"]:
        return overrides(current)
    if command == "logs" and (not rest or (len(rest) == 2 and rest[0] == "--cluster")):
        return _job_ids()
    return []  # a path: the shell's own file completion takes over


def _split(line: str) -> tuple[list[str], str]:
    """(finished words after the command name, the word being typed) of a command line up to the cursor."""
    try:
        words = shlex.split(line)
    except ValueError:  # an open quote while typing
        words = line.split()
    if not line or line[-1].isspace():
        words.append("")
    return words[1:-1], words[-1] if words else ""


def complete_command(args: list[str], commands: tuple[str, ...]) -> int:
    """``sdcluster __complete SHELL WORDBREAKS LINE``: print the candidates, one a line."""
    shell, breaks, line = [*args, "", "", ""][:3]
    words, current = _split(line)
    found = [c for c in candidates(words, current, commands) if c.startswith(current)]
    if shell == "bash":
        cut = max((current.rfind(ch) for ch in set(breaks) - set(" \t\n")), default=-1) + 1
        found = [c[cut:] for c in found]
    print("\n".join(found))
    return 0


def main(args: list[str]) -> int:
    if len(args) != 1 or args[0] not in ("bash", "zsh"):
        print(
            "usage: sdcluster completion bash|zsh\n\n"
            'Print a completion script. Bash: add `eval "$(sdcluster completion bash)"` to ~/.bashrc;\n'
            'zsh: add `eval "$(sdcluster completion zsh)"` to ~/.zshrc after compinit.',
            file=sys.stdout if args[:1] in (["-h"], ["--help"]) else sys.stderr,
        )
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    print(script(args[0]), end="")
    return 0
