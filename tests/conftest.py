"""Shared test helpers: small models, seeded weights and inputs, tolerances per dtype."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import attngraph as ag

# The benchmarks' helpers some tests share (bench/torch_bert.py, the plain-torch BERT; bench/gpu_ab.py).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

#: (rtol, atol) for comparing a computation against the float64 interpreter, by compute dtype.
TOLERANCE = {"float64": (1e-10, 1e-10), "float32": (1e-4, 1e-5), "float16": (1e-2, 1e-2)}


def example(graph, seed=0, **dims):
    """Random inputs for ``graph`` with its default dims, overridden by ``dims``."""
    sizes = {**graph.meta.get("dims", {}), **dims}
    meta = {graph.node(i).name: graph.node(i).meta for i in graph.inputs}
    return ag.random_inputs(graph.input_types(), sizes, seed, meta)


@pytest.fixture(scope="session")
def tiny_graph():
    return ag.models.load_graph("transformer-tiny")


@pytest.fixture(scope="session")
def tiny_params(tiny_graph):
    return ag.init_params(tiny_graph, seed=0, perturb=True)


def outputs_in_fresh_process(artifact: str, inputs: dict, tmp_path, *, runtime_only: bool = False) -> dict:
    """The outputs of artifact directory ``artifact`` on ``inputs``, computed by ``attngraph.load`` in a
    new Python process; ``runtime_only``: with TVM's runtime library alone (``TVM_USE_RUNTIME_LIB=1``),
    and that process checks that TVM's compiler library was never mapped."""
    np.savez(tmp_path / "in.npz", **inputs)
    code = ("import sys, numpy as np; from attngraph import api; x = dict(np.load(sys.argv[2])); "
            "np.savez(sys.argv[3], **api.load(sys.argv[1])(x)); "
            "assert sys.argv[4] != '1' or 'libtvm_compiler' not in open('/proc/self/maps').read(), "
            "'TVM compiler loaded'")
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1") if runtime_only else None
    run = subprocess.run([sys.executable, "-c", code, artifact, str(tmp_path / "in.npz"), str(tmp_path / "out.npz"),
                          "1" if runtime_only else "0"], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    with np.load(tmp_path / "out.npz") as out:
        return dict(out)
