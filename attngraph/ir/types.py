"""Tensor types: a dtype and a shape whose dims may be symbolic (see ``dims``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from . import dims as D
from .dims import Dim

#: dtype name -> short name used by the printer.
DTYPES = {
    "float64": "f64",
    "float32": "f32",
    "float16": "f16",
    "bfloat16": "bf16",
    "int64": "i64",
    "int32": "i32",
    "int8": "i8",  # quantized values (``quantize="int8"``)
    "uint8": "u8",  # quantized weights stored with an offset (the CPU's unsigned x signed dot products)
    "bool": "bool",
}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
#: storage types whose arithmetic runs in float32: each op's result rounded to them (``numpy_dtype``)
HALF_DTYPES = ("float16", "bfloat16")
INT_DTYPES = ("int64", "int32")


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype of dtype ``name`` (bfloat16: ``ml_dtypes``', which TVM's runtime reads too)."""
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def check_dtype(dtype) -> str:
    """Normalize a dtype (a name or a NumPy dtype) to one of ``DTYPES``, or raise."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise TypeError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    return name


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(D.canonical(d) for d in self.shape))
        object.__setattr__(self, "dtype", check_dtype(self.dtype))

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def symbols(self) -> set[str]:
        return {s for d in self.shape for s in D.symbols(d)}

    def concrete(self, bindings: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(D.evaluate(d, bindings) for d in self.shape)

    def numel(self) -> Dim:
        return D.product(self.shape)

    def with_shape(self, shape: Sequence[Dim]) -> "TensorType":
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: str) -> "TensorType":
        return TensorType(self.shape, dtype)

    def __str__(self) -> str:
        return f"{DTYPES[self.dtype]}[{', '.join(str(d) for d in self.shape)}]"

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(obj) -> "TensorType":
        return TensorType(tuple(obj["shape"]), obj["dtype"])
