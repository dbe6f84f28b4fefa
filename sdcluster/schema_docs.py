"""What every config key means and which options every config group has, read from the schema and ``conf/``.

The schema documents each field with a docstring right under it (``name: type = default`` then
a string literal). Python keeps no trace of such attribute docstrings at runtime, so they are read
from the class's source with ``ast`` (the same parse ``tests/config/test_schema_docs.py`` checks for
completeness). ``sdcluster launch --help`` prints them and shell completion offers the keys and options.
Imports only the schema and its `conf/` reader `config.store` (no Hydra, no torch): completion runs this on
every <Tab>.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
from dataclasses import dataclass
from functools import cache
from typing import Any

from sdcluster.config import Config, store  # store imports Hydra only when it registers


@dataclass(frozen=True)
class Key:
    """One leaf key of the config: ``optim.lr``, its type as written, its default and its docstring."""

    name: str
    type: str
    default: str
    doc: str


@dataclass(frozen=True)
class Section:
    """A top-level node of the config (``optim``) with its docstring, keys and ``conf/<group>/`` options."""

    name: str
    doc: str
    keys: tuple[Key, ...]
    options: tuple[str, ...]


@cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` of a dataclass, from the string statement right under each field."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef)).body
    docs = {}
    for stmt, following in zip(body, [*body[1:], None], strict=True):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        value = following.value if isinstance(following, ast.Expr) else None
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            docs[stmt.target.id] = " ".join(value.value.split())
    return docs


def inherited_docs(cls: type) -> dict[str, str]:
    """:func:`field_docs` of ``cls`` and of its dataclass bases (``optim.lr`` is documented once, on the base
    every optimizer's schema extends), a subclass's own docstring winning."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(field_docs(klass))
    return docs


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _shown(value: Any) -> str:
    """A default as it is written on the command line: ``null``, ``true``, ``[0.9, 0.999]``."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def leaf_keys(schema: type = Config, prefix: str = "") -> list[Key]:
    """Every leaf key under ``schema``, dotted, in the schema's order (nested dataclasses walked)."""
    found = []
    docs = inherited_docs(schema)
    for f in dataclasses.fields(schema):
        default = default_of(f)
        if dataclasses.is_dataclass(default):
            found += leaf_keys(type(default), f"{prefix}{f.name}.")
        else:
            found.append(Key(f"{prefix}{f.name}", str(f.type), _shown(default), docs.get(f.name, "")))
    return found


def entry_keys(schema: type, prefix: str) -> list[tuple[str, list[Key]]]:
    """For each list-of-dataclasses field under ``schema`` (``data.sources``): its dotted name and the keys
    of one entry, named as an entry's keys are written (``path``, ``repeats``)."""
    import typing

    found = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint = hints.get(f.name)
        args = typing.get_args(hint)
        if typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
            found.append((f"{prefix}{f.name}", leaf_keys(args[0])))
    return found


def group_options(group: str) -> list[str]:
    """The options of a config group: the YAML files of ``conf/<group>/`` (``conf/model/sd15.yaml``)."""
    return list(store.options(group))


def groups() -> list[str]:
    """The config groups of ``conf/`` (``local/``, the site's own settings, is not one)."""
    return store.config_groups()


def option_doc(group: str, option: str) -> str:
    """The first comment sentence of ``conf/<group>/<option>.yaml`` (what the option is), or ''."""
    path = store.conf_dir() / group / f"{option}.yaml"
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if not text.startswith("@package"):
            lines.append(text)
    text = " ".join(lines)
    return text.split(". ")[0].rstrip(".") if text else ""


def option_sections(default: Any, prefix: str) -> list[Section]:
    """For a group whose options have their own schemas (``OPTIONS``, as ``optim``'s): one section per option
    besides the default's, with the keys it adds or whose default it changes."""
    if not getattr(default, "OPTIONS", None):
        return []
    shown = set(leaf_keys(type(default), prefix))
    found = []
    for option, schema in getattr(default, "OPTIONS", {}).items():
        if schema is not type(default):
            keys = tuple(k for k in leaf_keys(schema, prefix) if k not in shown)
            found.append(Section(option, inspect.getdoc(schema) or "", keys, ()))
    return found


def sections() -> list[Section]:
    """The top-level scalar keys as one section named ``""``, then one section per node of the schema."""
    docs = field_docs(Config)
    top = []
    nodes = []
    for f in dataclasses.fields(Config):
        default = default_of(f)
        if dataclasses.is_dataclass(default):
            options = tuple(group_options(f.name))
            nodes.append(
                Section(f.name, docs.get(f.name, ""), tuple(leaf_keys(type(default), f"{f.name}.")), options)
            )
        else:
            top.append(Key(f.name, str(f.type), _shown(default), docs.get(f.name, "")))
    return [Section("", "the task, the run's name and where files go.", tuple(top), ()), *nodes]


REGENERATE = "python -m sdcluster.schema_docs --markdown > docs/reference/options.md"
"""The command that rewrites the options reference; the staleness test names it."""


def _cell(text: str) -> str:
    """Table-cell text: the schema's ``rst`` literals as Markdown ones, pipes escaped (they split cells)."""
    return text.replace("``", "`").replace("|", "\\|")


def _default_cell(default: str) -> str:
    if default in ("", "???"):  # MISSING, or an empty string: a value the user must (or may) give
        return "*required*" if default == "???" else '`""`'
    return f"`{_cell(default)}`"


def markdown() -> str:
    """The options reference page: override bundles, then each section with its options and key table.

    Built from the same extraction as ``sdcluster launch --help``, so the page, the help and shell
    completion cannot disagree; ``docs/reference/options.md`` is this output, checked by a test.
    """
    lines = [
        "# Options reference",
        "",
        f"<!-- generated by `{REGENERATE}`; do not edit by hand -->",
        "",
        "Every config key with its meaning (the schema's docstring), its default and each group's options.",
        "Set a key on the command line (`optim.lr=5e-6`), choose an option with `group=option`",
        "(`model=sd15`), or put either in `conf/local/<group>.yaml` (see the site setup guide).",
        "",
    ]
    found = sections()
    used = {section.name for section in found}
    for group in (g for g in groups() if g not in used):  # experiment/, debug/: override bundles
        lines += [f"## `{group}`", "", f"Override bundles in `conf/{group}/`.", ""]
        lines += ["| option | what it is |", "| --- | --- |"]
        for option in group_options(group):
            lines.append(f"| `{group}={option}` | {_cell(option_doc(group, option))} |")
        lines.append("")
    for section in found:
        lines += [f"## `{section.name}`" if section.name else "## Top level", "", _cell(section.doc), ""]
        if section.options:
            plus = "+" if section.name == "cluster" else ""  # not in config.yaml's defaults: appended
            choices = ", ".join(f"`{plus}{section.name}={o}`" for o in section.options)
            lines += [f"Options: {choices}.", ""]
        lines += ["| key | default | meaning |", "| --- | --- | --- |"]
        lines += [f"| `{k.name}` | {_default_cell(k.default)} | {_cell(k.doc)} |" for k in section.keys]
        lines.append("")
        default = getattr(Config(), section.name, None) if section.name else None
        for name, keys in entry_keys(type(default), f"{section.name}.") if default is not None else []:
            lines += [f"### Each entry of `{name}`", "", "| key | default | meaning |", "| --- | --- | --- |"]
            lines += [f"| `{k.name}` | {_default_cell(k.default)} | {_cell(k.doc)} |" for k in keys]
            lines.append("")
        for option in option_sections(default, f"{section.name}."):  # optim=adafactor: its own keys
            doc = " ".join(option.doc.split())
            lines += [f"### `{section.name}={option.name}`", "", _cell(doc), ""]
            lines += ["| key | default | meaning |", "| --- | --- | --- |"]
            lines += [f"| `{k.name}` | {_default_cell(k.default)} | {_cell(k.doc)} |" for k in option.keys]
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--markdown"]:
        sys.exit(f"usage: {REGENERATE}")
    sys.stdout.write(markdown())
