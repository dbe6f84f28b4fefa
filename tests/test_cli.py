"""The ``sdcluster`` command: version, help, delegation to the modules it fronts, shell completion.

Every command runs as a user runs it, in a subprocess: through the installed console script and through
``python -m sdcluster``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sdcluster
from sdcluster.config import Config
from tests.conftest import REPO

SCRIPT = Path(sys.executable).parent / "sdcluster"  # where pip put the console script of this environment
ENTRIES = {"script": [str(SCRIPT)], "module": [sys.executable, "-m", "sdcluster"]}


def sdc(*args: str, entry: str = "script", home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SDCLUSTER_HOME": str(home)} if home else None
    cmd = [*ENTRIES[entry], *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, env=env)


def _leaves(schema: type, prefix: str = "") -> dict[str, str]:
    """Every leaf key of the schema and its type, walked independently of the code under test."""
    found = {}
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            found.update(_leaves(type(default), f"{prefix}{f.name}."))
        else:
            found[f"{prefix}{f.name}"] = str(f.type)
    return found


def _owners(schema: type, prefix: str = "") -> dict[str, str]:
    """Every leaf key and the name of the dataclass that declares it (``optim.lr`` -> ``OptimConfig``)."""
    found = {}
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            found.update(_owners(type(default), f"{prefix}{f.name}."))
        else:  # the class whose body declares it: a base's field is documented there (optim.lr)
            owner = next(c for c in schema.__mro__ if f.name in vars(c).get("__annotations__", {}))
            found[f"{prefix}{f.name}"] = owner.__name__
    return found


def test_version_is_the_package_metadata():
    assert sdcluster.__version__ == importlib.metadata.version("sdcluster")
    for entry in ENTRIES:
        shown = sdc("--version", entry=entry)
        assert (shown.returncode, shown.stdout) == (0, f"sdcluster {sdcluster.__version__}\n"), shown.stderr


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_help_lists_every_command_with_one_line(entry):
    shown = sdc("--help", entry=entry)
    assert shown.returncode == 0, shown.stderr
    for command in ("launch", "generate", "logs", "sweep", "data", "models", "completion"):
        line = next((ln for ln in shown.stdout.splitlines() if ln.split()[:1] == [command]), None)
        assert line and len(line.split()) > 3, f"{command}: no one-line summary in\n{shown.stdout}"


def test_every_command_has_its_own_help():
    for command in ("logs", "sweep", "data", "models", "generate", "completion"):
        shown = sdc(command, "--help")
        assert shown.returncode == 0 and "usage:" in shown.stdout, (command, shown.stdout, shown.stderr)
    assert "sdcluster sweep" in sdc("sweep", "--help").stdout and "list" in sdc("sweep", "--help").stdout


def test_an_unknown_command_names_the_nearest_one():
    shown = sdc("lauch")
    assert shown.returncode == 2 and "Did you mean `sdcluster launch`?" in shown.stderr


def test_launch_help_documents_every_key_and_every_group_option():
    from tests.config.test_schema_docs import schema_fields

    shown = sdc("launch", "--help")
    assert shown.returncode == 0, shown.stderr
    text = " ".join(shown.stdout.split())  # wrapped lines joined: a docstring may span several
    docs = {
        (cls, name): doc for (_, cls), fields in schema_fields().items() for name, (_, doc) in fields.items()
    }
    for key, owner in _owners(Config).items():
        assert f" {key}=" in f" {text}", f"{key} missing from sdcluster launch --help"
        words = " ".join(docs[owner, key.rsplit(".", 1)[-1]].replace("``", "`").split()[:6])
        assert words in text, f"{key}: its docstring ({words}...) is not shown"
    for group in ("model", "data", "cluster", "experiment", "debug"):
        for option in (REPO / "conf" / group).glob("*.yaml"):
            assert f"{group}={option.stem}" in text or f"|{option.stem}" in text, (group, option.stem)
    assert "+cluster=local|slurm" in text and "-m, --multirun" in text


def test_launch_is_python_m_sdcluster_launch(tmp_path):
    """Hydra's own flags and overrides pass through unchanged; so do its errors and ours."""
    args = ["--cfg", "job", "optim.lr=0.25", "model=tiny_sdxl"]
    direct = subprocess.run(
        [sys.executable, "-m", "sdcluster.launch", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert direct.returncode == 0, direct.stderr
    for entry in ENTRIES:
        via = sdc("launch", *args, entry=entry)
        assert (via.returncode, via.stdout) == (0, direct.stdout), via.stderr
    assert "lr: 0.25" in direct.stdout and "name: tiny_sdxl" in direct.stdout
    # a multirun, each point checked and printed (dry run) by the same launcher plugin and launch path
    roots = [f"{key}={tmp_path / key}" for key in ("output_root", "jobs_root", "cache_root")]
    sweep = ["-m", "launch.dry_run=true", "optim.lr=0.5,0.125", *roots]
    direct = subprocess.run(
        [sys.executable, "-m", "sdcluster.launch", *sweep],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    swept = sdc("launch", *sweep)
    assert swept.returncode == direct.returncode == 0, swept.stderr
    stamp = re.compile(r"^\[[\d :,-]+\]", re.M)  # Hydra's log lines carry the time
    assert stamp.sub("", swept.stdout) == stamp.sub("", direct.stdout)
    assert "Launching 2 jobs" in swept.stdout and "lr: 0.125" in swept.stdout
    wrong = sdc("launch", "optim.learning_rate=1e-5")
    assert wrong.returncode == 2 and "sdcluster: configuration error: optim.learning_rate" in wrong.stderr


def test_generate_is_launch_with_task_generate():
    shown = sdc("generate", "--cfg", "job", "generate.steps=3")
    assert shown.returncode == 0 and "task: generate" in shown.stdout and "steps: 3" in shown.stdout
    refused = sdc("generate", "task=train")
    assert refused.returncode == 2 and "sdcluster launch task=" in refused.stderr
    helped = sdc("generate", "--help")
    assert "generate.num_images=" in helped.stdout and "task=generate" in helped.stdout


# ---- shell completion ------------------------------------------------------------------------------------


def _bash_complete(script: Path, line: str, words: list[str]) -> list[str]:
    """Call the completion function as bash does on <Tab>: COMP_LINE/POINT and COMP_WORDS/CWORD set (words
    split where bash splits them, ``=`` included)."""
    quoted = " ".join(f"'{w}'" for w in words)
    program = (
        f"source {script}; COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; COMP_WORDS=({quoted}); "
        f'COMP_CWORD={len(words) - 1}; _sdcluster; printf "%s\\n" "${{COMPREPLY[@]}}"'
    )
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_bash_completion_offers_commands_keys_and_group_options(tmp_path):
    script = tmp_path / "sdcluster.bash"
    shown = sdc("completion", "bash")
    assert shown.returncode == 0
    script.write_text(shown.stdout)
    assert "complete -o nospace -o default -F _sdcluster sdcluster" in shown.stdout
    assert _bash_complete(script, "sdcluster l", ["sdcluster", "l"]) == ["launch ", "logs "]
    keys = _bash_complete(script, "sdcluster launch optim.", ["sdcluster", "launch", "optim."])
    assert "optim.lr=" in keys and "optim.lr_schedule=" in keys
    assert set(keys) == {f"{k}=" for k in _leaves(Config) if k.startswith("optim.")}
    options = _bash_complete(script, "sdcluster launch model=", ["sdcluster", "launch", "model", "="])
    assert sorted(options) == sorted(f"{p.stem} " for p in (REPO / "conf" / "model").glob("*.yaml"))
    # bash replaces only the part after `=`: candidates carry no `model=` again
    assert _bash_complete(
        script, "sdcluster launch model=sd1", ["sdcluster", "launch", "model", "=", "sd1"]
    ) == [
        "sd14 ",
        "sd15 ",
    ]
    assert _bash_complete(script, "sdcluster launch +clu", ["sdcluster", "launch", "+clu"]) == ["+cluster="]
    nested = _bash_complete(script, "sdcluster launch train.lo", ["sdcluster", "launch", "train.lo"])
    assert nested == ["train.log_every=", "train.lora."]
    assert _bash_complete(script, "sdcluster sweep ", ["sdcluster", "sweep", ""]) == [
        "list ",
        "report ",
        "resubmit ",
    ]


def test_zsh_completion_offers_keys_and_group_options(tmp_path):
    """zsh's completion system runs only inside the line editor: ``compadd`` is replaced by a function that
    prints what it was given (a function shadows a builtin in zsh), ``words``/``CURRENT`` set as zsh sets
    them."""
    script = tmp_path / "_sdcluster"
    script.write_text(sdc("completion", "zsh").stdout)
    assert subprocess.run(["zsh", "-n", str(script)], capture_output=True, timeout=30).returncode == 0

    def complete(*words: str) -> list[str]:
        program = (
            f'compdef() {{ :; }}; source {script}; compadd() {{ print -r -- "$*"; }}; '
            f"words=({' '.join(words)}); CURRENT={len(words)}; _sdcluster"
        )
        done = subprocess.run(["zsh", "-f", "-c", program], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    (keys,) = complete("sdcluster", "launch", "optim.")
    assert keys.startswith("-S  -- ") and "optim.lr=" in keys.split()  # no space after a key: a value follows
    (options,) = complete("sdcluster", "launch", "model=")
    assert options.split()[1:] == [
        f"model={p.stem}" for p in sorted((REPO / "conf" / "model").glob("*.yaml"))
    ]
    (commands,) = complete("sdcluster", "s")
    assert commands.split() == ["--", "sweep"]


def test_help_and_completion_read_the_config_tree_launch_composes():
    """schema_docs reads the config tree through config.store (the one reader launch composes with),
    without importing Hydra: completion runs on every <Tab>."""
    from sdcluster import schema_docs
    from sdcluster.config.store import config_groups

    assert schema_docs.groups() == config_groups() and "model" in config_groups()
    code = "import sys; from sdcluster import schema_docs as s; s.groups(); s.group_options('model'); "
    code += "print(any(m.split('.')[0] == 'hydra' for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", done.stderr
