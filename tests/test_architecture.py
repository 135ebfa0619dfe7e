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


def test_targets_choose_their_kernels_through_their_table_only():
    """A target's hand kernels are rows of its ``KernelTable``: a target class may override ``kernel`` or
    ``forms`` only to pass the table's result through (``super()``), never to test the op itself."""
    targets = os.path.join(PACKAGE, "backends", "tvm", "targets")
    found = []
    for folder, _, files in os.walk(targets):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            with open(path) as fh:
                tree = ast.parse(fh.read(), path)
            for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
                for fn in cls.body:
                    if not (isinstance(fn, ast.FunctionDef) and fn.name in ("kernel", "forms")):
                        continue
                    found.append(f"{f}:{cls.name}.{fn.name}")
                    if cls.name in ("Target", "KernelTable"):
                        continue
                    src = ast.unparse(fn)
                    assert f"super().{fn.name}(" in src or ("super()" in src and f".{fn.name}(" in src), \
                        f"{path}: {cls.name}.{fn.name} does not ask the table"
                    assert ".op" not in src and "op ==" not in src, f"{path}: {cls.name}.{fn.name} tests the op"
    assert "base.py:Target.kernel" in found and "base.py:Target.forms" in found


def test_the_kernel_table_asks_its_rows_in_order():
    from attngraph.backends.tvm.targets.table import MAIN, ROW_OPS, KernelTable, Row
    from attngraph.backends.tvm.plan import FEW_ROWS, KernelSpec
    from attngraph.ir import TensorType

    t = TensorType(("rows", 8), "float32")
    spec = KernelSpec("k", "softmax", {"axis": -1}, (t,), t)
    table = KernelTable(Row("declines while building", ("softmax",), lambda s, dv, ctx: None),
                        Row("not this dtype", ROW_OPS, lambda s, dv, ctx: "f64", dtypes=("float64",)),
                        Row("guarded off", ROW_OPS, lambda s, dv, ctx: "off", guard=lambda s, ctx: ctx == "no"),
                        Row("this one", ROW_OPS, lambda s, dv, ctx: "row kernel"),
                        Row("few rows", ("softmax",), lambda s, dv, ctx: "few", form=FEW_ROWS),
                        Row("later", ("softmax",), lambda s, dv, ctx: "later"))
    assert table.kernel(spec, None, "yes") == "row kernel" and table.forms(spec, None, "yes") == {FEW_ROWS: "few"}
    assert table.serves(spec, "yes") and not table.serves(spec, "yes", ("matmul",))
    assert {"softmax", "layer_norm"} <= table.ops() and "matmul" not in table.ops() and MAIN == ""
