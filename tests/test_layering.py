"""The package's import graph: one direction through ``latentstore/``, no cycles, no private
names reached across modules.

Imports are read with ``ast`` from the source, function-local ones included (a cycle hidden in a
function is still a cycle), ``if TYPE_CHECKING:`` blocks excluded (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "latentstore"

#: Every module's place, lowest first: a module may import only modules before it. The field
#: module is the top of the core (as Django's files.py is): it uses staging, the codec, decoding
#: and signing, and nothing below it imports it. Above it: queries over fields, the worker-side
#: protocol, and the entry points (views, admin, commands, checks, apps).
ORDER: list[str] = [
    "conf",
    "exceptions",
    "models",
    "broker",
    "celery_config",
    "latents",
    "families",
    "images",
    "columns",
    "blobs",
    "staging",
    "forms",
    "preview",
    "pictures",
    "packing",
    "quality",
    "decoders",
    "cache",
    "dispatch",
    "decoding",
    "signing",
    "fields",
    "queries",
    "encoding",
    "tasks",
    "maintenance",
    "html",
    "templatetags",
    "templatetags.latentstore",
    "views",
    "urls",
    "admin",
    "rest_framework",
    "sources",
    "importing",
    "exporting",
    "samples",
    "shards",
    "cards",
    "exports",
    "training",
    "management",
    "management.base",
    "management.commands",
    "management.commands.*",
    "checks",
    "wiring",
    "apps",
    "",  # the package's __init__
]


def module_name(path: Path) -> str:
    """``latentstore/a/b.py`` -> ``a.b``; a package's ``__init__`` is the package's name."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "migrations" not in p.parts}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in node.body:
                skipped.update(id(n) for n in ast.walk(inner))
    return skipped


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that module ``name`` (at ``path``) imports."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_nodes(tree)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ["latentstore", *name.split(".")] if name else ["latentstore"]
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
        for target in targets:
            if target != "latentstore" and not target.startswith("latentstore."):
                continue
            relative = target.removeprefix("latentstore").removeprefix(".")
            while relative and relative not in known:
                relative = relative.rpartition(".")[0]
            # The package itself (``from latentstore import x``) is no dependency: x is.
            if relative and relative in known and relative != name:
                found.add(relative)
    return found


def graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a self-import)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return cycles


def place(name: str) -> int:
    if name in ORDER:
        return ORDER.index(name)
    parent = name.rpartition(".")[0]
    if f"{parent}.*" in ORDER:
        return ORDER.index(f"{parent}.*")
    raise KeyError(name)


def test_the_package_has_no_import_cycle():
    cycles = find_cycles(graph())
    assert not cycles, f"import cycles inside latentstore/: {cycles}"


def test_the_cycle_finder_finds_cycles():
    # The test above is only as good as its finder: a cycle of three, a self-import and a
    # chain that is no cycle.
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"d"}, "e": {"a"}}
    assert find_cycles(edges) == [["a", "b", "c"], ["d"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_local_imports_and_skips_type_checking(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from latentstore import fields\n"
        "def f():\n    from latentstore.decoding import render\n"
        "from . import conf\n"
    )
    found = imports_of("x", path, {"fields", "decoding", "conf"})
    assert found == {"decoding", "conf"}


def test_every_module_has_a_place_and_imports_only_what_stands_before_it():
    edges = graph()
    unplaced = []
    for name in edges:
        try:
            place(name)
        except KeyError:
            unplaced.append(name)
    assert not unplaced, f"give these modules a place in ORDER: {unplaced}"
    upward = [
        f"{name} imports {target}"
        for name, targets in sorted(edges.items())
        for target in sorted(targets)
        if place(target) >= place(name)
    ]
    assert not upward, "imports against the order (lowest first):\n" + "\n".join(upward)


def test_fields_is_the_top_of_the_core():
    importers = sorted(name for name, targets in graph().items() if "fields" in targets)
    below = [name for name in importers if place(name) < place("fields")]
    assert not below, below


def _private_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    modules: set[str] = set()  # local names bound to latentstore modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("latentstore"):
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{path.name}: from {node.module} import {alias.name}")
                elif (PACKAGE / (alias.name + ".py")).exists():
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("latentstore.") and alias.asname:
                    modules.add(alias.asname)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_module_reaches_into_another_modules_private_names():
    found = [use for path in package_modules().values() for use in _private_uses(path)]
    assert not found, found


@pytest.mark.parametrize("limit", [650])
def test_no_module_is_too_long_to_read(limit):
    # ~600 lines is the aim; this is the line no module may cross unnoticed.
    long = {
        name: n
        for name, path in package_modules().items()
        if (n := len(path.read_text().splitlines())) > limit
    }
    assert not long, long


def test_the_web_tier_never_imports_the_worker_side():
    offenders = [
        name
        for name, path in package_modules().items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(
            (a.name if isinstance(node, ast.Import) else node.module or "").startswith(
                ("latentstore_workers", "workers", "torch", "diffusers")
            )
            for a in node.names
        )
        and name != "training"  # the training dataset is worker-side code by design
    ]
    assert not offenders, offenders
