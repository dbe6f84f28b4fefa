"""The cluster wing's seams: one backend protocol, the job's runtime apart from the login side, imports
only downward, and job callables pickled at their old path still load.

Read from the source (the import statements and string constants), not from a running program: what is
checked is where code lives and what it may name.
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

from sdcluster.config import Config
from tests.conftest import REPO

PACKAGE = REPO / "sdcluster"
BACKENDS = PACKAGE / "cluster" / "backends"
SCHEDULER_WORDS = ("sacct", "squeue", "scontrol", "sbatch", "scancel", "sinfo")


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, ast.Module]:
    return {_module(p): ast.parse(p.read_text()) for p in PACKAGE.rglob("*.py")}


def _imports(tree: ast.Module, top_level_only: bool) -> set[str]:
    """The sdcluster modules a module imports (``from a import b`` counts ``a`` and ``a.b``); with
    ``top_level_only``, what runs at import time (not in functions, not under ``TYPE_CHECKING``)."""
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    if top_level_only:
        visit(tree.body)
    else:
        for node in ast.walk(tree):
            visit([node] if isinstance(node, (ast.Import, ast.ImportFrom)) else [])
    return {name for name in found if name.startswith("sdcluster")}


def _within(names: set[str], prefixes: tuple[str, ...]) -> set[str]:
    return {n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)}


def test_nothing_outside_the_backends_names_a_scheduler():
    """No code (docstrings and comments aside) outside ``cluster/backends`` names a backend, a SLURM
    variable or a SLURM command. The schema (``config/``) is below the backends and names its values;
    ``schema_docs`` means the ``conf/local`` folder of site settings."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if BACKENDS in path.parents or path.parent.name == "config" or path.name == "schema_docs.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                text = node.value
                if text in ("slurm", "local") or "SLURM_" in text or set(text.split()) & set(SCHEDULER_WORDS):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {text[:60]!r}")
    assert not found, "\n".join(found)


def test_the_runtime_and_the_cluster_base_import_only_downward():
    """runtime/ reaches the cluster wing only at its base (records, backends); the base imports neither
    the runtime nor the login side; data, models, train and generate never import the login side."""
    sources = _sources()
    login = ("sdcluster.cluster.preflight", "sdcluster.cluster.submit", "sdcluster.cluster.dry_run")
    login += ("sdcluster.cluster.launching", "sdcluster.cluster.interrupts", "sdcluster.cluster.callables")
    base = ("sdcluster.cluster.records", "sdcluster.cluster.backends")
    wrong = []
    for name, tree in sources.items():
        imported = _imports(tree, top_level_only=False)
        if _within({name}, ("sdcluster.runtime",)):
            cluster = _within(imported, ("sdcluster.cluster",)) - {"sdcluster.cluster"}
            wrong += [f"{name} -> {m}" for m in cluster - _within(cluster, base)]
        if _within({name}, base):
            wrong += [f"{name} -> {m}" for m in _within(imported, ("sdcluster.runtime", *login))]
        if _within({name}, ("sdcluster.data", "sdcluster.models", "sdcluster.train", "sdcluster.generate")):
            wrong += [f"{name} -> {m}" for m in _within(imported, login)]
    assert not wrong, "\n".join(wrong)


def test_the_import_chains_of_the_cluster_side_are_at_most_8_deep():
    """What ``import sdcluster.sweep.points`` (or the launcher, logs, status) loads one module inside the
    other is at most 8 modules deep (a package's ``__init__`` counts: importing ``a.b`` runs ``a``)."""
    sources = _sources()
    edges: dict[str, set[str]] = {}
    for name, tree in sources.items():
        direct = {m for m in _imports(tree, top_level_only=True) if m in sources}
        parents = {".".join(m.split(".")[:k]) for m in direct for k in range(1, m.count(".") + 1)}
        own = {p for p in direct | parents if p == name or name.startswith(p + ".")}  # already importing
        edges[name] = ((direct | parents) & set(sources)) - own
    depth: dict[str, int] = {}

    def deepest(name: str, seen: tuple[str, ...] = ()) -> int:
        assert name not in seen, f"import cycle: {' -> '.join((*seen, name))}"
        if name not in depth:
            depth[name] = 1 + max((deepest(d, (*seen, name)) for d in edges[name]), default=0)
        return depth[name]

    tops = [n for n in sources if _within({n}, ("sdcluster.cluster", "sdcluster.runtime", "sdcluster.sweep"))]
    tops += ["sdcluster.launch", "sdcluster.logs", "sdcluster.status", "sdcluster.paths"]
    too_deep = {n: deepest(n) for n in tops if deepest(n) > 8}
    assert not too_deep, too_deep


@pytest.mark.parametrize("kind", ["TrainJob", "GenerateJob"])
def test_a_job_pickled_at_the_old_path_loads(kind):
    """submitit pickles a job's callable by module path: a job queued before the callables moved to
    ``sdcluster.runtime.callables`` and requeued after unpickles through ``sdcluster.cluster.callables``."""
    from sdcluster.runtime import callables

    job = getattr(callables, kind)(Config())
    data = pickle.dumps(job, protocol=0)  # protocol 0: the class path is plain text, rewritable
    assert b"sdcluster.runtime.callables" in data
    old = data.replace(b"sdcluster.runtime.callables", b"sdcluster.cluster.callables")
    loaded = pickle.loads(old)
    assert type(loaded) is getattr(callables, kind) and loaded.cfg == job.cfg
