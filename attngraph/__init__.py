"""attngraph: declare Transformers in a Python DSL, optimize the graph, compile with TVM, verify
the compiled numerics against a NumPy reference interpreter."""

from . import ir, models, nn
from .artifact import ArtifactError, build, load
from .backends import reference
from .inputs import InputError, random_inputs
from .ir import Graph, TensorType
from .nn import InputSpec, Module, Parameter, trace
from .weights import WeightsError, init_params, load_weights, save_weights

__version__ = "0.1.0"

__all__ = ["ArtifactError", "build", "load", "ir", "models", "nn", "reference", "InputError", "random_inputs", "Graph", "TensorType",
           "InputSpec", "Module", "Parameter", "trace", "WeightsError", "init_params", "load_weights",
           "save_weights", "__version__"]
