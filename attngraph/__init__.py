"""attngraph: declare Transformers in a Python DSL, optimize the graph, compile with TVM, verify
the compiled numerics against a NumPy reference interpreter."""

from . import ir, models, nn, reference
from .backends import ArtifactError
from .inputs import InputError, random_inputs
from .ir import Graph, TensorType
from .nn import InputSpec, Module, Parameter, trace
from .passes.autodiff import AutodiffError, grad
from .threads import get_num_threads, set_num_threads
from .version import __version__
from .weights import WeightsError, init_params, load_weights, save_weights


_COMPILE_API = ("build", "compile", "load", "verify")
_TORCH_API = ("from_torch", "from_exported")


def __getattr__(name):
    # The compile API imports TVM (seconds) and the torch frontend torch: only when used, so that `show` and
    # `run` start fast.
    if name in _COMPILE_API:
        from . import api
        return getattr(api, name)
    if name in _TORCH_API:
        from .frontends import torch_export
        return getattr(torch_export, name)
    raise AttributeError(f"module 'attngraph' has no attribute {name!r}")

__all__ = ["ArtifactError", "build", "compile", "load", "verify", "from_torch", "from_exported", "ir", "models", "nn", "reference", "InputError", "random_inputs", "Graph", "TensorType",
           "InputSpec", "Module", "Parameter", "trace", "AutodiffError", "grad", "WeightsError", "init_params", "load_weights",
           "save_weights", "get_num_threads", "set_num_threads", "__version__"]
