"""What a model's inputs are: ``InputSpec``."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir import TensorType
from ..ir.dims import Dim


@dataclass(frozen=True)
class InputSpec:
    """A model input: its shape (with symbolic dims), dtype and, for integers, the valid range
    ``[low, high)`` (token ids, say) that random test inputs are drawn from."""

    shape: tuple[Dim, ...]
    dtype: str = "float32"
    low: int | None = None
    high: int | None = None
    kind: str | None = None  # e.g. "tokens", "padding_mask": how example inputs are made

    @property
    def type(self) -> TensorType:
        return TensorType(tuple(self.shape), self.dtype)

    def meta(self) -> dict:
        return {k: v for k, v in (("low", self.low), ("high", self.high), ("kind", self.kind)) if v is not None}
