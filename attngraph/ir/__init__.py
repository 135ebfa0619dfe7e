"""The IR: tensor types with symbolic dims, the op registry, and the graph."""

from . import dims, fused, ops  # noqa: F401  (importing fused registers the fused ops)
from .graph import Graph, GraphError, Node
from .ops import REGISTRY, OpDef, ShapeError
from .printer import to_dot, to_text
from .types import DTYPES, TensorType

__all__ = ["dims", "ops", "Graph", "GraphError", "Node", "REGISTRY", "OpDef", "ShapeError",
           "to_dot", "to_text", "DTYPES", "TensorType"]
