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


def _default_of_cluster_name(tree: ast.Module) -> set[int]:
    """The one constant of the schema that may name a backend: the default of ``ClusterConfig.name``."""
    return {
        id(stmt.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and node.name == "ClusterConfig"
        for stmt in node.body
        if isinstance(stmt, ast.AnnAssign) and ast.unparse(stmt.target) == "name" and stmt.value is not None
    }


# Where "local" means the gitignored ``conf/local`` folder of site settings, not the backend.
SITE_FOLDER = {PACKAGE / "schema_docs.py", PACKAGE / "config" / "store.py"}


def test_nothing_outside_the_backends_names_a_scheduler():
    """No code (docstrings and comments aside) outside ``cluster/backends`` names a backend, a SLURM
    variable or a SLURM command, the schema (``config/``) included: its only backend name is the default of
    ``cluster.name``, and ``schema_docs``/``config/store`` name the ``conf/local`` folder of site settings."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        if BACKENDS in path.parents:
            continue
        tree = ast.parse(path.read_text())
        # docstrings, the schema's field docstrings included: every string that is a statement of its own
        allowed = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        allowed |= _default_of_cluster_name(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in allowed:
                text = node.value
                if text == "local" and path in SITE_FOLDER:
                    continue
                if text in ("slurm", "local") or "SLURM_" in text or set(text.split()) & set(SCHEDULER_WORDS):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {text[:60]!r}")
    assert not found, "\n".join(found)


def test_every_cluster_option_has_a_backend_and_every_backend_an_option():
    """``cluster.name``'s values are the files of ``conf/cluster/``; each must select a registered backend,
    and each backend must be selectable (``+cluster=NAME``)."""
    from sdcluster.cluster import backends
    from sdcluster.config import CLUSTERS

    options = {p.stem for p in (REPO / "conf" / "cluster").glob("*.yaml")}
    assert options == {b.name for b in backends.registered()}
    assert set(CLUSTERS) == options


def test_the_runtime_and_the_cluster_base_import_only_downward():
    """runtime/ reaches the cluster wing only at its base (records, backends); the base imports neither
    the runtime nor the login side; data, models, train and generate never import the login side."""
    sources = _sources()
    login = ("sdcluster.cluster.preflight", "sdcluster.cluster.submit", "sdcluster.cluster.dry_run")
    login += ("sdcluster.cluster.submit_and_wait", "sdcluster.cluster.interrupts")
    login += ("sdcluster.cluster.callables",)
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


def _named_strings(node: ast.AST) -> list[str]:
    """The string constants of a comparison's operand or a key: one, or a tuple/list/set of them."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [text for element in node.elts for text in _named_strings(element)]
    return []


def test_nothing_outside_the_registries_branches_on_a_family_method_or_component_name():
    """Outside the families (``models/family.py``, the tiny builders), the methods (``train/method.py``), the
    single-file layouts (``train/single_file.py``) and the schema (``config/``), no family name, method name
    or SD-only component name is compared (``==``, ``in``...) or used as a key (``x["unet"]``,
    ``{"unet": ...}``, ``.get("unet")``): code asks the family or the method object. A key that is also a
    schema key (``train.lora``, ``generate.lora``, the blocks of
    a config turned into a dict) is the schema's word, not a method's name."""
    from dataclasses import fields

    from sdcluster.config import GenerateConfig, TrainConfig
    from sdcluster.config.checks import TRAIN_METHODS
    from sdcluster.models.family import FAMILIES

    names = {family.name for family in FAMILIES.values()} | set(TRAIN_METHODS)
    names |= {"unet", "text_encoder_2", "tokenizer_2"}
    schema_keys = {f.name for f in (*fields(TrainConfig), *fields(GenerateConfig))}
    # train/single_file.py: the original checkpoint layouts, one table keyed by pipeline class (a
    # family's ``pipeline_name``), whose entries are the component folders that layout is made of.
    registries = {"models/family.py", "train/method.py", "train/single_file.py"}
    found = []
    for path in PACKAGE.rglob("*.py"):
        where = path.relative_to(PACKAGE).as_posix()
        if where in registries or where.startswith(("config/", "models/tiny")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            keys: list[str] = []
            if isinstance(node, ast.Compare):
                compared = [t for operand in (node.left, *node.comparators) for t in _named_strings(operand)]
            else:
                compared = []
                if isinstance(node, ast.Subscript):
                    keys = _named_strings(node.slice)
                elif isinstance(node, ast.Dict):
                    keys = [t for key in node.keys if key is not None for t in _named_strings(key)]
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
                    keys = _named_strings(node.args[0]) if node.func.attr in ("get", "pop") else []
            if set(compared) & names or (set(keys) - schema_keys) & names:
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not found, "\n".join(found)
