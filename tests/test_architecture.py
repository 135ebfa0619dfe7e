"""The shape of the code: no import cycle between the package's modules, nothing imported from tests/
by the package or the benchmarks, and every op of the registry lowered and tested on every target
that runs here (``test_tvm_ops.py`` holds the cases)."""

from __future__ import annotations

import ast
import os

import networkx as nx
import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PACKAGE = os.path.join(ROOT, "attngraph")


def _modules() -> dict[str, str]:
    """{dotted module name: path} of every module of the package (a package is its __init__)."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return out


def import_graph() -> nx.DiGraph:
    """Module -> the package modules it imports, at module level or inside a function (each ``import``
    and ``from ... import``; a name that is a submodule counts as that module; not those for type
    checkers only).  A package's __init__ is not imported by importing one of its modules here: that is
    Python's doing, not a dependency."""
    modules = _modules()
    g = nx.DiGraph()
    for name, path in modules.items():
        g.add_node(name)
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for block in ast.walk(tree):  # imports for type checkers only are not imports
            if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                block.body = []
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    g.add_edge(name, t)
    return g


def test_no_import_cycles_between_the_packages_modules():
    g = import_graph()
    assert len(g) > 60
    cycles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_layers_point_one_way():
    """The IR imports nothing else of the package; the passes and the interpreter nothing of the backends."""
    g = import_graph()
    for module in g:
        deps = set(g.successors(module))
        if module.startswith("attngraph.ir"):
            assert all(d.startswith("attngraph.ir") for d in deps), (module, deps)
        if module.startswith(("attngraph.passes", "attngraph.reference")):
            assert not any(d.startswith("attngraph.backends.tvm") for d in deps), (module, deps)


@pytest.mark.parametrize("folder", ["attngraph", "bench", "examples"])
def test_nothing_imports_from_tests(folder):
    for path, _, files in os.walk(os.path.join(ROOT, folder)):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(path, f)) as fh:
                    text = fh.read()
                tree = ast.parse(text)
                imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
                imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
                assert not any(m == "tests" or m.startswith("tests.") or m in ("conftest", "cuda_emu")
                               for m in imported), os.path.join(path, f)
                assert '"tests"' not in text and "'tests'" not in text, os.path.join(path, f)
