"""Shared test helpers: small models, seeded weights and inputs, tolerances per dtype."""

from __future__ import annotations

import pytest

import attngraph as ag

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
