"""The helpers every lowering uses: broadcasting reads, constants, the masks over TVM expressions."""

from __future__ import annotations

from tvm import te, tirx

from ....ir import TensorType
from ....ir.fused import MaskOps


def bcast(t: te.Tensor, out_rank: int):
    """Index function reading ``t`` broadcast to rank ``out_rank`` (NumPy rules; size-1 dims read 0)."""
    shape = list(t.shape)
    offset = out_rank - len(shape)

    def read(*idx):
        return t[tuple(0 if isinstance(d, tirx.IntImm) and d.value == 1 else idx[offset + i]
                       for i, d in enumerate(shape))]
    return read


def const(value, dtype):
    return tirx.const(value, dtype)


def dtype_of(x) -> str:
    """The dtype of a PrimExpr (tensor reads have ``dtype``; arithmetic nodes only ``ty``)."""
    return getattr(x, "dtype", None) or str(x.ty)


def te_mask_ops(dtype: str) -> MaskOps:
    """``ir.fused.apply_masks`` over TVM expressions of ``dtype``."""
    return MaskOps(lambda a, b: a + b, tirx.Select, lambda v: const(v, dtype))


def placeholder_types(ts) -> list[TensorType]:
    """Placeholders as attngraph types: static dims as ints, every symbolic one as "n" (which is not 1)."""
    return [TensorType(tuple(int(d) if isinstance(d, tirx.IntImm) else "n" for d in t.shape), str(t.dtype)) for t in ts]
