"""``Module`` and ``Parameter``: models written the way PyTorch users write them.

A module's parameters live at dotted paths (``encoder.layers.0.self_attn.q_proj.weight``) found by
walking its attributes.  A parameter is a declaration (shape, dtype, how to initialize it); its
values live outside the graph, in a weights dict keyed by those paths.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ..ir import TensorType
from ..ir.dims import Dim
from .tensor import Tensor, TensorOps, current_tracer


class Parameter(TensorOps):
    """A named weight.  ``init`` says how ``attngraph.weights.init_params`` fills it:
    ``("normal", std)``, ``("uniform", bound)``, ``("xavier_uniform",)``, ``("zeros",)`` or ``("ones",)``."""

    def __init__(self, shape, dtype: str = "float32", init=("xavier_uniform",)):
        shape = tuple(shape)
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 1 for d in shape):
            raise ValueError(f"Parameter shape {shape}: sizes must be integers of at least 1")
        self.shape_ = tuple(int(d) for d in shape)
        self.dtype_ = dtype
        self.init = tuple(init)

    @property
    def shape(self):
        return self.shape_

    @property
    def dtype(self):
        return self.dtype_

    def _traced(self) -> Tensor:
        return current_tracer().param(self)

    def __repr__(self) -> str:
        return f"Parameter({TensorType(self.shape_, self.dtype_)}, init={self.init})"


class Buffer(TensorOps):
    """A constant tensor a module holds (``Module.register_buffer``, as PyTorch's: GPT-2's causal
    ``bias``, a table of positions).  In the graph it is a ``const`` named by its path, made once per
    trace; a float64 array is a float32 tensor, as every constant in the DSL, its value kept in float64
    (``tensor.const_attrs``)."""

    def __init__(self, value):
        self.value = np.asarray(value)

    @property
    def shape(self):
        return self.value.shape

    @property
    def dtype(self):
        return "float32" if self.value.dtype == np.float64 else str(self.value.dtype)

    def _traced(self) -> Tensor:
        return current_tracer().buffer(self)

    def __repr__(self) -> str:
        return f"Buffer({TensorType(self.value.shape, self.dtype)})"


class Module:
    """Base class for layers and models: assign Parameters and Modules as attributes, write ``forward``.

    ``training`` (set for a module and its submodules by ``train()`` and ``eval()``, as PyTorch's) says
    whether a trace is of training, with dropout, or of inference; unlike PyTorch's, a module starts in
    eval mode: a graph is for inference unless asked otherwise."""

    def __init__(self):
        object.__setattr__(self, "_params", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "training", False)

    def train(self, mode: bool = True) -> "Module":
        for _, m in self.named_modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def __setattr__(self, name, value):
        if "_params" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() "
                                 f"before assigning {name!r}")
        self._params.pop(name, None)
        self._modules.pop(name, None)
        self._buffers.pop(name, None)
        if isinstance(value, Parameter):
            self._params[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        elif isinstance(value, Buffer):
            self._buffers[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, value) -> None:
        """Hold the array ``value`` as ``self.<name>``, a constant of the graph (as PyTorch's)."""
        setattr(self, name, Buffer(value.detach().cpu().numpy() if hasattr(value, "detach") else value))

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        yield prefix, self
        for name, m in self._modules.items():
            yield from m.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Parameter]]:
        """Every parameter once, at the first path that reaches it (shared weights keep one name)."""
        return self._named("_params", prefix)

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, Buffer]]:
        """Every buffer once, at the first path that reaches it."""
        return self._named("_buffers", prefix)

    def _named(self, table: str, prefix: str):
        seen = set()
        for mname, m in self.named_modules(prefix):
            for name, value in getattr(m, table).items():
                if id(value) not in seen:
                    seen.add(id(value))
                    yield (f"{mname}.{name}" if mname else name), value

    def parameter_types(self) -> dict[str, TensorType]:
        return {n: TensorType(p.shape, p.dtype) for n, p in self.named_parameters()}

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args, **kwargs):
        tracer = current_tracer()  # a clear TraceError outside attngraph.trace
        tracer.scope.append(tracer.module_names.get(id(self), ""))
        try:
            return self.forward(*args, **kwargs)
        finally:
            tracer.scope.pop()


class ModuleList(Module):
    """Submodules at paths ``0``, ``1``, ... (as ``torch.nn.ModuleList``)."""

    def __init__(self, modules=()):
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)

    def __getitem__(self, i):
        return list(self._modules.values())[i]
