"""The schema says what every key means: a docstring right under each dataclass field (torchtitan's style).

Parsed with ``ast``, since Python keeps no trace of attribute docstrings at runtime; the runtime fields are
used only to check that the parse saw every one of them.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import typing
from pathlib import Path

from sdcluster.config import Config
from tests.conftest import REPO

SCHEMA = REPO / "sdcluster" / "config"
HYDRA_SIDE = {"store.py"}  # registers the schema with Hydra; not schema
MODULES = sorted(p for p in SCHEMA.glob("*.py") if p.name not in HYDRA_SIDE)


def _module_name(path: Path) -> str:
    return "sdcluster.config" if path.stem == "__init__" else f"sdcluster.config.{path.stem}"


def _is_dataclass(node: ast.ClassDef) -> bool:
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
        if name == "dataclass":
            return True
    return False


def _docstring(stmt: ast.stmt | None) -> str | None:
    value = stmt.value if isinstance(stmt, ast.Expr) else None
    return value.value if isinstance(value, ast.Constant) and isinstance(value.value, str) else None


def schema_fields() -> dict[tuple[Path, str], dict[str, tuple[int, str | None]]]:
    """``(file, class) -> {field: (line, docstring or None)}`` for every dataclass of the schema modules.

    ``ClassVar`` attributes (what a run's identity leaves out, ...) count as fields: they are meaning too.
    """
    found: dict[tuple[Path, str], dict[str, tuple[int, str | None]]] = {}
    for path in MODULES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for cls in ast.walk(tree):
            if not (isinstance(cls, ast.ClassDef) and _is_dataclass(cls)):
                continue
            fields = found.setdefault((path, cls.name), {})
            for i, stmt in enumerate(cls.body):
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    following = cls.body[i + 1] if i + 1 < len(cls.body) else None
                    fields[stmt.target.id] = (stmt.lineno, _docstring(following))
    return found


def test_every_schema_field_has_a_docstring_under_it():
    missing = [
        f"{path.relative_to(REPO)}:{line} {cls}.{name}"
        for (path, cls), fields in schema_fields().items()
        for name, (line, doc) in fields.items()
        if not (doc and doc.strip())
    ]
    assert not missing, (
        'fields without a docstring right under them (name: type = default, then """What it means."""):\n  '
        + "\n  ".join(missing)
    )


def test_the_parse_sees_every_runtime_field():
    parsed = schema_fields()
    assert parsed, "no dataclass found in the schema modules"
    for (path, cls), fields in parsed.items():
        module = importlib.import_module(_module_name(path))
        klass = getattr(module, cls)  # the fields its body declares; a base's are checked on the base
        declared = vars(klass).get("__annotations__", {})
        runtime = {f.name for f in dataclasses.fields(klass) if f.name in declared}
        assert runtime <= set(fields), (path.name, cls, runtime - set(fields))


def test_every_group_of_the_config_lives_in_a_parsed_module():
    parsed = {(_module_name(path), cls) for path, cls in schema_fields()}
    pending, seen = [Config], set()
    while pending:
        cls = pending.pop()
        assert (cls.__module__, cls.__name__) in parsed, f"{cls.__name__} ({cls.__module__}) is not parsed"
        seen.add(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default) and type(default) not in seen:
                pending.append(type(default))
        for hint in typing.get_type_hints(cls).values():  # a typed list of schemas (data.sources)
            items = typing.get_args(hint) if typing.get_origin(hint) is list else ()
            pending += [c for c in items if dataclasses.is_dataclass(c) and c not in (*seen, *pending)]
        # a group whose options have their own schemas (optim=adafactor), and the base they extend
        related = [*getattr(cls, "OPTIONS", {}).values(), *cls.__mro__[1:]]
        pending += [c for c in related if dataclasses.is_dataclass(c) and c not in seen and c not in pending]
    # every parsed dataclass is reachable from Config: no orphan schema that Hydra would never validate
    assert {(cls.__module__, cls.__name__) for cls in seen} == parsed
    groups = {type(getattr(Config(), f.name)).__name__ for f in dataclasses.fields(Config)}
    assert {"ModelConfig", "DataConfig", "OptimConfig", "TrainConfig", "GenerateConfig"} <= groups


def test_schema_modules_stay_plain_and_short():
    """Job functions import the schema: no Hydra, no torch (``store.py`` is Hydra's side); <= 300 lines."""
    for path in MODULES:
        source = path.read_text()
        assert len(source.splitlines()) <= 300, f"{path.name}: over 300 lines, split it"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            heavy = [n for n in names if n.split(".")[0] in ("hydra", "torch")]
            assert not heavy, f"{path.name}:{node.lineno} imports {heavy}"


def test_the_options_reference_lists_the_keys_of_each_source_entry():
    """``data.sources`` is a list of entries with keys of their own: the reference has a table of them."""
    from sdcluster.config.data import SourceConfig
    from sdcluster.schema_docs import markdown

    page = markdown()
    table = page.split("### Each entry of `data.sources`", 1)[1].split("\n#", 1)[0]
    for f in dataclasses.fields(SourceConfig):
        assert f"| `{f.name}` |" in table, f"{f.name} missing from the sources entry table"
    assert "| `repeats` | `1` |" in table
