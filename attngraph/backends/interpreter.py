"""The reference interpreter as a target: ``attngraph.compile(model, target="numpy")`` gives an
``InterpretedModel``, called as a compiled model is (``model(inputs, keep=..., into=...)``, ``model.put``,
``model.get``), so that training steps, validation and checks run on it with no branch of their own.

Its "device" is the host: values are NumPy arrays, a float held in the model's precision (``float32``, or
``float64``: the oracle the compiled models are checked against).  A model built in a half type (``dtype=
"float16"``) runs the graph ``to_dtype`` made, each value rounded to that type as a build stores it, and its
outputs of that type come back in it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from ..ir import Graph
from ..ir.types import FLOAT_DTYPES, HALF_DTYPES, numpy_dtype

NUMPY = "numpy"
PRECISIONS = ("float32", "float64")


class InterpretedModel:
    """``graph`` with ``params`` bound, run by ``reference.run`` in ``precision``."""

    target = NUMPY

    def __init__(self, graph: Graph, params: Mapping[str, np.ndarray], precision: str = "float32"):
        if precision not in PRECISIONS:
            raise ValueError(f"the interpreter computes in {' or '.join(PRECISIONS)}, not {precision!r}")
        self.graph, self.params, self.precision = graph, dict(params), precision
        self.report = None

    def put(self, array, dtype: str):
        """``array`` as this model holds an input of type ``dtype``: a float in the model's precision (a float64
        value stays float64 in a float64 run: nothing rounded to the graph's float32 first)."""
        return np.array(array, dtype=self.precision if dtype in FLOAT_DTYPES else dtype)

    def get(self, value) -> np.ndarray:
        """A value of this model's (an output kept by ``keep``, an input ``put``) on the host: a copy."""
        return np.array(value)

    def outputs_apart(self, names: Collection[str]) -> None:
        """Every output is an array of its own here already."""

    def __call__(self, inputs: Mapping, *, keep: Collection[str] = (), into: Mapping | None = None,
                 observe=None) -> dict:
        """The outputs by name, each a fresh host array (``keep`` and ``into`` mean nothing more here); an output of
        a half type in that type, as a build stores it."""
        from .. import reference
        unknown = set(keep) - {name for name, _ in self.graph.outputs}
        if unknown:
            raise KeyError(f"keep names no output of {self.graph.name}: {', '.join(sorted(unknown))}")
        out = reference.run(self.graph, inputs, self.params, dtype=self.precision, observe=observe)
        types = self.graph.output_types()
        return {k: v.astype(numpy_dtype(types[k].dtype)) if types[k].dtype in HALF_DTYPES else v
                for k, v in out.items()}


__all__ = ["InterpretedModel", "NUMPY", "PRECISIONS"]
