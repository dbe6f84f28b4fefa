"""The docs describe the tree as it is: the module map, the wings' import rules, every module a text names.

Three promises, each read from the files themselves so that moving, adding or renaming a module without
updating what describes it fails here:

- ``docs/architecture.md`` (Module map) lists every ``.py`` file of ``sdcluster/``, and nothing else;
- each wing's ``__init__`` docstring (and the package's, for the top-level modules) says what its modules may
  import in ``May import`` paragraphs, and every sdcluster import of every module keeps to them;
- no docstring, comment or config file names a module that does not exist, or a README section that moved.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "sdcluster"
ARCHITECTURE = REPO / "docs" / "architecture.md"
WINGS = ("config", "models", "data", "train", "generate", "cluster", "runtime", "sweep")


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name relative to ``sdcluster`` ("" is the package itself)."""
    found = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


# --- 1. the module map -------------------------------------------------------------------------------------


def _module_map() -> dict[str, str]:
    """First cell -> second cell of every table row under ``## Module map`` in docs/architecture.md."""
    text = ARCHITECTURE.read_text()
    assert "\n## Module map\n" in text, "docs/architecture.md needs its '## Module map' section"
    section = text.split("\n## Module map\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        cell = re.fullmatch(r"`([\w/]+\.py)`", cells[0]) if line.startswith("|") else None
        if cell:
            rows[cell.group(1)] = cells[1] if len(cells) > 1 else ""
    return rows


def test_module_map_lists_every_module_of_the_package_and_no_other() -> None:
    rows = _module_map()
    files = {str(p.relative_to(PKG)) for p in PKG.rglob("*.py")}
    assert not files - rows.keys(), f"docs/architecture.md (Module map) misses {sorted(files - rows.keys())}"
    assert not rows.keys() - files, f"docs/architecture.md (Module map) names {sorted(rows.keys() - files)}"
    empty = [name for name, what in rows.items() if not what]
    assert not empty, f"say what these modules do in docs/architecture.md (Module map): {empty}"


# --- 2. layering -------------------------------------------------------------------------------------------


@dataclass
class Part:
    """One ``May import`` paragraph: the wing's modules it covers (None: the rest), what they may import."""

    label: str
    members: tuple[str, ...] | None
    allowed: tuple[str, ...]


_MAY = re.compile(r"May import(?: \((?P<part>[^)]*)\))?:(?P<rest>.*)", re.DOTALL)
_NAME = re.compile(r"``([\w.]+)``|:mod:`~?sdcluster\.([\w.]+)`")


def _parts(wing: str) -> list[Part]:
    """The ``May import`` paragraphs of a wing's (or, for "", the package's) ``__init__`` docstring."""
    init = PKG / wing / "__init__.py" if wing else PKG / "__init__.py"
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    parts = []
    for paragraph in doc.split("\n\n"):
        match = _MAY.match(paragraph.strip())
        if not match:
            continue
        label, _, members = (match.group("part") or "all").partition(":")
        names = tuple(a or b for a, b in _NAME.findall(match.group("rest")))
        covered = tuple(m.strip() for m in members.split(",")) if members else None
        parts.append(Part(label.strip(), covered, names))
    return parts


def _imports(path: Path, module: str) -> set[str]:
    """Every sdcluster module ``path`` imports (module level and in functions, not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]))
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = ("sdcluster." + package).rstrip(".").split(".")
                    base = ".".join(anchor[: len(anchor) - child.level + 1] + ([base] if base else []))
                # ``from sdcluster.cluster import backends`` imports the module cluster.backends
                for alias in child.names:
                    found.add(f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base)
            visit(child)

    visit(tree)
    return {name.removeprefix("sdcluster").lstrip(".") for name in found if name.split(".")[0] == "sdcluster"}


def _is_module(dotted: str) -> bool:
    path = REPO / dotted.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _within(name: str, scope: str) -> bool:
    return name == scope or name.startswith(scope + ".")


def _part_of(module: str, wing: str, parts: list[Part]) -> Part:
    """The part a module of the wing belongs to: the one naming its first component there, else the rest."""
    local = module.removeprefix(wing).lstrip(".").split(".")[0]
    named = [p for p in parts if p.members is not None and local in p.members]
    rest = [p for p in parts if p.members is None]
    candidates = named or rest
    assert len(candidates) == 1, f"sdcluster.{module}: {len(candidates)} May import parts cover it, not one"
    return candidates[0]


def _wing_of(module: str) -> str:
    head = module.split(".")[0]
    return head if head in WINGS else ""


def _members(wing: str, parts: list[Part], part: Part, modules: dict[str, Path]) -> set[str]:
    """The modules of a wing in one part: they may import each other."""
    return {m for m in modules if m and _wing_of(m) == wing and _part_of(m, wing, parts) is part}


def test_every_wing_says_what_it_may_import() -> None:
    for wing in ("", *WINGS):
        parts = _parts(wing)
        assert parts, f"sdcluster/{wing}/__init__.py: its docstring needs a 'May import:' paragraph"
        named = [m for p in parts for m in p.members or ()]
        unknown = [m for m in named if not _is_module(f"sdcluster.{wing}.{m}".replace("..", "."))]
        assert not unknown, f"sdcluster/{wing}/__init__.py: May import names no module {unknown}"
        for part in parts:
            for name in part.allowed:
                assert _is_module(f"sdcluster.{name}"), f"sdcluster/{wing}/__init__.py: no module {name}"


def test_every_import_keeps_to_its_wing_s_may_import_lines() -> None:
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        if module == "":  # the package's __init__ holds only the version, which every module may read
            assert not _imports(path, module), "sdcluster/__init__.py must import nothing of sdcluster"
            continue
        wing = _wing_of(module)
        parts = _parts(wing)
        part = _part_of(module, wing, parts)  # a wing's __init__ belongs to its rest
        mates = _members(wing, parts, part, modules)
        for target in _imports(path, module):
            if target == "" or any(_within(target, m) for m in mates):
                continue  # the package root (its version) or a module of the same part
            if not any(_within(target, name) for name in part.allowed):
                where = f"{wing or 'top level'}: {part.label}"
                wrong.append(f"sdcluster.{module} imports sdcluster.{target} ({where})")
    assert not wrong, "imports that no 'May import' line allows:\n" + "\n".join(wrong)


# --- 3. names in docstrings, comments and configs -----------------------------------------------------------


def _scanned() -> list[Path]:
    """Package sources and assets, the Hydra plugin, the benchmarks, ``conf/`` (not the user's conf/local)."""
    files = [*PKG.rglob("*.py"), *PKG.rglob("*.yaml"), *(REPO / "hydra_plugins").rglob("*.py")]
    files += [*(REPO / "benchmarks").rglob("*.py"), *(REPO / "conf").rglob("*.yaml")]
    return [f for f in files if "local" not in f.relative_to(REPO).parts[:2]]


def _defines(path: Path, attrs: list[str]) -> bool:
    """Whether a module defines ``attrs[0]`` at top level (and, for a class, ``attrs[1]`` in its body)."""
    body = ast.parse(path.read_text()).body
    for name in attrs:
        found = None
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == name:
                found = node
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    found = node
            elif isinstance(node, ast.Import | ast.ImportFrom) and any(
                (a.asname or a.name.split(".")[0]) == name for a in node.names
            ):
                found = node
        if found is None:
            return False
        if not isinstance(found, ast.ClassDef):
            return True  # an attribute of a function or a value: not followed further
        body = found.body
    return True


def _dotted_problem(dotted: str) -> str | None:
    """None if ``sdcluster.a.b[.attr...]`` is a module, or a module and names it defines; else the problem."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = REPO / "/".join(parts[:cut])
        path = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
        if path.exists():
            if cut == len(parts) or _defines(path, parts[cut:]):
                return None
            return f"{'.'.join(parts[:cut])} defines no {'.'.join(parts[cut:])}"
    return "no such module"


def _path_exists(name: str, where: Path) -> bool:
    """A ``x/y.py`` path, read from the repo, the package or any folder above the file that names it."""
    bases = [REPO, PKG, *[p for p in where.parents if REPO in (p, *p.parents)]]
    return any((base / name).exists() for base in bases)


_DOTTED = re.compile(r"(?<![\w.])sdcluster(?:\.\w+)+")
_PATH = re.compile(r"(?<![\w/.<>-])((?:[\w.-]+/)+\w+\.py)\b")


def test_no_text_names_a_module_that_does_not_exist() -> None:
    wrong = []
    for path in _scanned():
        text = path.read_text()
        where = path.relative_to(REPO)
        for match in _DOTTED.finditer(text):
            problem = _dotted_problem(match.group(0))
            if problem:
                wrong.append(f"{where}: {match.group(0)}: {problem}")
        for match in _PATH.finditer(text):
            if not _path_exists(match.group(1), path):
                wrong.append(f"{where}: {match.group(1)}: no such file")
    assert not wrong, "names of modules and files that do not exist:\n" + "\n".join(wrong)


def test_no_text_sends_the_reader_to_the_readme() -> None:
    """README is a landing page: what a docstring, error message or config pointed at there moved to docs/."""
    wrong = []
    for path in _scanned():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "README" in line:
                wrong.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not wrong, "point these at the docs/ page that has the text:\n" + "\n".join(wrong)
