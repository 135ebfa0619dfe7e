"""The CPU target's own ops, each defined in one place: the type rule and NumPy meaning (registered in
the IR's op table, so the interpreter runs a graph in this target's layout) and the lowering.

``pack_panels`` lays a weight out as contiguous column panels once, when the weights are bound;
``linear_packed`` is the projection reading them (``layout.pack_weights`` puts both in the graph)."""

from __future__ import annotations

import numpy as np

from .....ir import ops as O
from .....ir.fused import ACTIVATIONS, linear
from .....ir.fused import _activate as activate
from .....ir.ops import FUSED, LAYOUT, ShapeError, op
from .....ir.types import TensorType
from ...lower.registry import lowering

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _infer_pack_panels(types, attrs):
    (w,) = types
    width, dtype, group = attrs["width"], attrs.get("dtype") or w.dtype, attrs.get("interleave", 1)
    if w.rank != 2 or not all(isinstance(d, int) for d in w.shape):
        raise ShapeError(f"pack_panels needs a 2-D weight of static shape, got {w}")
    if not isinstance(width, int) or width < 1:
        raise ShapeError(f"pack_panels: width must be a positive int, got {width!r}")
    if not w.is_float or dtype not in FLOAT_DTYPES:
        raise ShapeError(f"pack_panels packs float weights into {', '.join(FLOAT_DTYPES)}, got {w} -> {dtype}")
    k, n = w.shape
    if not isinstance(group, int) or group < 1 or k % group:
        raise ShapeError(f"pack_panels: interleave must be a positive int dividing the weight's {k} rows, "
                         f"got {group!r}")
    panels = -(-n // width)
    return TensorType((panels, k, width) if group == 1 else (panels, k // group, width, group), dtype)


@op("pack_panels", LAYOUT, 1, _infer_pack_panels, dtype=None, interleave=1)
def pack_panels(w, *, width, dtype=None, interleave=1):
    """A (K, N) weight as column panels (ceil(N/width), K, width), the last panel zero-padded: each
    panel is contiguous, so a matmul kernel streams it without a strided read (``linear_packed``).
    ``dtype`` stores the panels in another float type (float16: half the bytes a decode step reads).
    ``interleave`` > 1 keeps that many consecutive K values of a column together, (ceil(N/width), K/interleave,
    width, interleave): the operand of a dot-product instruction (bfloat16 pairs: ``dot.py``)."""
    k, n = w.shape
    panels = -(-n // width)
    padded = np.zeros((k, panels * width), dtype or w.dtype)
    padded[:, :n] = w
    if interleave > 1:
        return np.ascontiguousarray(padded.reshape(k // interleave, interleave, panels, width).transpose(2, 0, 3, 1))
    return np.ascontiguousarray(padded.reshape(k, panels, width).transpose(1, 0, 2))


def unpacked(w, n: int):
    """The (K, n) weight of panels ``w`` (``pack_panels``'s inverse)."""
    if w.ndim == 4:
        panels, pairs, width, group = w.shape
        return w.transpose(1, 3, 0, 2).reshape(pairs * group, panels * width)[:, :n]
    panels, k, width = w.shape
    return w.transpose(1, 0, 2).reshape(k, panels * width)[:, :n]


def panels_depth(w) -> int:
    """K of panels of type ``w``: (panels, K, width) or (panels, K/group, width, group)."""
    return w.shape[1] * (w.shape[3] if w.rank == 4 else 1)


def _infer_linear_packed(types, attrs):
    if len(types) not in (2, 3):
        raise ShapeError(f"linear_packed takes x, packed weight and an optional bias, got {len(types)} operands")
    x, w = types[0], types[1]
    n = attrs["n"]
    if attrs.get("activation", "none") not in ACTIVATIONS:
        raise ShapeError(f"unknown activation {attrs['activation']!r}")
    if w.rank not in (3, 4) or x.rank < 1 or x.shape[-1] != panels_depth(w) or not isinstance(n, int) \
            or not (w.shape[0] - 1) * w.shape[2] < n <= w.shape[0] * w.shape[2]:
        raise ShapeError(f"linear_packed needs x (..., K) and weight panels (ceil(n/w), K, w) or (ceil(n/w), K/g, w, "
                         f"g) for n={n}, got {x} and {w}")
    if len(types) == 3 and types[2].shape != (n,):
        raise ShapeError(f"linear_packed bias must have shape ({n},), got {types[2]}")
    # The weight may be stored narrower than x (float16 panels); the product is computed in x's dtype.
    if not w.is_float or np.dtype(w.dtype).itemsize > np.dtype(x.dtype).itemsize:
        raise ShapeError(f"linear_packed weight {w} must be a float no wider than x {x}")
    return TensorType(x.shape[:-1] + (n,), O._same_dtype([x] + list(types[2:])))


@op("linear_packed", FUSED, None, _infer_linear_packed, flops=O.contraction_flops, activation="none", n=None)
def linear_packed(x, w, b=None, *, activation="none", n=None):
    """``linear`` over a weight in column panels (``pack_panels``): the CPU target's layout."""
    return linear(x, unpacked(w, n).astype(x.dtype), b, activation=activation)



def _infer_swiglu_packed(types, attrs):
    n = attrs["n"]
    if not isinstance(n, int) or n < 1:
        raise ShapeError(f"swiglu_packed: n must be a positive int, got {n!r}")
    if attrs.get("gate", 0) not in (0, 1):
        raise ShapeError(f"swiglu_packed: gate is the half holding the gate, 0 or 1, got {attrs['gate']!r}")
    both = _infer_linear_packed(types, {"activation": "none", "n": 2 * n})
    return TensorType(both.shape[:-1] + (n,), both.dtype)


def _swiglu_flops(attrs, in_shapes, out_shape) -> int:
    return 2 * O.contraction_flops(attrs, in_shapes, out_shape)  # the gate's product and the value's


@op("swiglu_packed", FUSED, None, _infer_swiglu_packed, flops=_swiglu_flops, n=None, gate=0)
def swiglu_packed(x, w, b=None, *, n=None, gate=0):
    """LLaMA's gated projection over packed panels: ``h = x @ W + b`` (W (K, 2n): two halves of n columns, the
    gate's the first (``gate=0``) or the second (``gate=1``)), ``silu(gate half) * the other half``, the gate
    applied as the product is written back."""
    h = linear_packed(x, w, b, n=2 * n)
    halves = h[..., :n], h[..., n:]
    return (O.get("silu").ref(halves[gate]) * halves[1 - gate]).astype(x.dtype)


# The lowerings import TVM when they run: this module also loads where only TVM's runtime is (an artifact).

@lowering("pack_panels")
def _pack_panels(c):
    from tvm import te, tirx

    from ...lower.common import const
    (w,) = c.xs
    width, n, group = c.attrs["width"], w.shape[1], c.attrs.get("interleave", 1)
    zero = const(0.0, w.dtype)

    def at(p, k, col):
        return tirx.Select(p * width + col < n, w[k, tirx.min(p * width + col, n - 1)], zero).astype(c.out.dtype)
    if group == 1:
        return te.compute(c.shape, at, name=c.name)
    return te.compute(c.shape, lambda p, q, col, j: at(p, q * group + j, col), name=c.name)


def _panel_at(w, k, n):
    """W[k, n] of panels ``w`` (a TE tensor): (panels, K, width) or (panels, K/group, width, group)."""
    width = int(w.shape[2])
    if len(w.shape) == 3:
        return w[n // width, k, n % width]
    group = int(w.shape[3])
    return w[n // width, k // group, n % width, k % group]


@lowering("linear_packed")
def _linear_packed(c):
    from tvm import te

    from ...lower.contraction import epilogue
    x, w = c.xs[0], c.xs[1]
    k = te.reduce_axis((0, x.shape[-1]), name="k")
    y = te.compute(c.shape, lambda *i: te.sum(x[i[:-1] + (k,)] * _panel_at(w, k, i[-1]).astype(x.dtype), axis=k),
                   name=f"{c.name}_mm")
    return epilogue(c, y, c.xs[2] if len(c.xs) == 3 else None)


@lowering("swiglu_packed")
def _swiglu_packed(c):
    from tvm import te, tirx

    x, w = c.xs[0], c.xs[1]
    n = c.attrs["n"]
    k = te.reduce_axis((0, x.shape[-1]), name="k")
    shape = tuple(c.shape[:-1]) + (2 * n,)
    h = te.compute(shape, lambda *i: te.sum(x[i[:-1] + (k,)] * _panel_at(w, k, i[-1]).astype(x.dtype), axis=k),
                   name=f"{c.name}_mm")
    if len(c.xs) == 3:
        b = c.xs[2]
        h = te.compute(shape, lambda *i: h[i] + b[i[-1]], name=f"{c.name}_bias")

    first = c.attrs["gate"] * n  # the gate's first column

    def gated(*i):
        gate = h[i[:-1] + (i[-1] + first,)]
        return gate * tirx.sigmoid(gate) * h[i[:-1] + (i[-1] + n - first,)]
    return te.compute(c.shape, gated, name=c.name)


# int8 (``quantize="int8"``): symmetric quantization to [-127, 127], the weights per output column (scales computed
# once, when the weights are bound), the activations per row (in the kernel, at each call); int32 sums of exact
# products, one float32 rescale per output.  The arithmetic is defined here once, in float32 whatever the operands'
# type, so the interpreter (any precision) and the kernels agree on every rounding.

#: the quantized range: [-QMAX, QMAX]
QMAX = 127
#: How quantized weights are stored, by the K values of a column their panels keep together (the group each lane of
#: the CPU's integer dot product multiplies): (dtype, offset), each value stored as q + offset.
INT8_STORAGE = {
    4: ("uint8", 128),  # vpdpbusd (VNNI) multiplies 4 unsigned bytes (the weights') by 4 signed ones (x's): x stays
                        # signed, and each row's sum of its quantized values, times the offset, is taken back out
    2: ("int8", 0),     # vpmaddwd (AVX2, AVX-512) multiplies pairs of signed 16-bit values: the bytes sign-extended
}
#: the group of the panels where the CPU has no integer dot-product kernel (the generic lowering reads any)
INT8_GROUP = 4


def _scales(amax):
    """float32 scales amax / QMAX."""
    return (np.asarray(amax, np.float32) / np.float32(QMAX)).astype(np.float32)


def _quantized(v, scale):
    """round(v / scale) (to nearest even), in [-QMAX, QMAX]; 0 where the scale is 0 (an all-zero row or column)."""
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.rint(v / safe)
    return np.where(scale > 0, np.clip(q, -QMAX, QMAX), 0).astype(np.int8)


def _infer_column_scales(types, attrs):
    (w,) = types
    if w.rank != 2 or not w.is_float or not all(isinstance(d, int) for d in w.shape):
        raise ShapeError(f"column_scales needs a 2-D float weight of static shape, got {w}")
    return TensorType((w.shape[1],), "float32")


@op("column_scales", LAYOUT, 1, _infer_column_scales)
def column_scales(w):
    """The int8 scale of each column of a (K, N) weight: max |W[:, n]| / 127, float32."""
    return _scales(np.abs(np.asarray(w, np.float32)).max(axis=0))


def _infer_quantize_panels(types, attrs):
    (w,) = types
    width, group = attrs["width"], attrs["interleave"]
    if w.rank != 2 or not w.is_float or not all(isinstance(d, int) for d in w.shape):
        raise ShapeError(f"quantize_panels needs a 2-D float weight of static shape, got {w}")
    k, n = w.shape
    if not isinstance(width, int) or width < 1 or group not in INT8_STORAGE or k % group:
        raise ShapeError(f"quantize_panels: a positive width, an interleave in {sorted(INT8_STORAGE)} and K a multiple "
                         f"of it, got width {width!r}, interleave {group!r}, K {k}")
    return TensorType((-(-n // width), k // group, width, group), INT8_STORAGE[group][0])


@op("quantize_panels", LAYOUT, 1, _infer_quantize_panels, interleave=INT8_GROUP)
def quantize_panels(w, *, width, interleave=INT8_GROUP):
    """A (K, N) float weight quantized per column (``column_scales``) and stored as q + offset in panels of
    ``interleave`` K values (``INT8_STORAGE``: 4: uint8 q + 128; 2: int8 q), (ceil(N/width), K/interleave, width,
    interleave) (``pack_panels(interleave=)``'s layout), the padding columns 0."""
    group = interleave
    dtype, offset = INT8_STORAGE[group]
    w32 = np.asarray(w, np.float32)
    q = _quantized(w32, column_scales(w32)[None, :]).astype(np.int16) + offset
    return pack_panels(q.astype(dtype), width=width, interleave=group)


def stored_int8(panels) -> np.ndarray:
    """The quantized values (int32) of quantized panels (``quantize_panels``), still in panels."""
    offset = INT8_STORAGE[panels.shape[3]][1]
    return np.asarray(panels).astype(np.int32) - offset


def _infer_linear_int8(types, attrs):
    if len(types) not in (3, 4):
        raise ShapeError(f"linear_int8 takes x, quantized panels, scales and an optional bias, got {len(types)} "
                         f"operands")
    x, w, s = types[:3]
    n = attrs["n"]
    if attrs.get("activation", "none") not in ACTIVATIONS:
        raise ShapeError(f"unknown activation {attrs['activation']!r}")
    if w.rank != 4 or INT8_STORAGE.get(w.shape[3], (None,))[0] != str(w.dtype) or x.rank < 1 \
            or x.shape[-1] != w.shape[1] * w.shape[3] or not isinstance(n, int) \
            or not (w.shape[0] - 1) * w.shape[2] < n <= w.shape[0] * w.shape[2]:
        raise ShapeError(f"linear_int8 needs x (..., K) and quantized panels (ceil(n/w), K/g, w, g) for n={n} (uint8 "
                         f"for g 4, int8 for g 2), got {x} and {w}")
    if s.shape != (n,) or str(s.dtype) != "float32":
        raise ShapeError(f"linear_int8 scales must be float32 of shape ({n},), got {s}")
    if x.dtype != "float32":
        raise ShapeError(f"linear_int8 takes float32 x, got {x}")
    if len(types) == 4 and types[3].shape != (n,):
        raise ShapeError(f"linear_int8 bias must have shape ({n},), got {types[3]}")
    return TensorType(x.shape[:-1] + (n,), x.dtype)


def quantized_rows(x):
    """(q int8, scale float32) of each row of ``x`` (its last axis): scale max |row| / 127, q round(x / scale)."""
    x32 = np.asarray(x, np.float32)
    scale = _scales(np.abs(x32).max(axis=-1, keepdims=True))
    return _quantized(x32, scale), scale


@op("linear_int8", FUSED, None, _infer_linear_int8, flops=O.contraction_flops, activation="none", n=None)
def linear_int8(x, w, scales, b=None, *, activation="none", n=None):
    """activation(x @ W + b) in int8: x quantized per row (``quantized_rows``), W per column (``quantize_panels``),
    their products summed exactly in int32, then float32(sum) * x's scale * W's scale [+ b]."""
    xq, sx = quantized_rows(x)
    wq = unpacked(stored_int8(w), n)
    acc = np.matmul(xq.astype(np.int64), wq).astype(np.int32)  # exact: |sum| < 2^31 for K < 2^17
    y = acc.astype(np.float32) * sx * np.asarray(scales, np.float32)
    if b is not None:
        y = y + np.asarray(b, np.float32)
    return activate(y, activation).astype(np.asarray(x).dtype)


def te_quantized(v, scale):
    """``_quantized`` of one float32 value with its scale, as a TVM expression (int8)."""
    from tvm import tirx
    f32 = "float32"
    safe = tirx.Select(scale > tirx.const(0.0, f32), scale, tirx.const(1.0, f32))
    q = tirx.max(tirx.min(tirx.nearbyint(v / safe), tirx.const(QMAX, f32)), tirx.const(-QMAX, f32))
    return tirx.Select(scale > tirx.const(0.0, f32), q, tirx.const(0.0, f32)).astype("int8")


def te_scale(amax):
    from tvm import tirx
    return amax / tirx.const(QMAX, "float32")


def te_column_scales(w, name: str):
    """``column_scales`` of TE tensor ``w`` (K, N): float32 (N,)."""
    from tvm import te, tirx
    k = te.reduce_axis((0, w.shape[0]), name=f"{name}_k")
    amax = te.compute((w.shape[1],), lambda j: te.max(tirx.abs(w[k, j].astype("float32")), axis=k), name=f"{name}_amax")
    return te.compute((w.shape[1],), lambda j: te_scale(amax[j]), name=name)


@lowering("column_scales")
def _column_scales(c):
    return te_column_scales(c.xs[0], c.name)


@lowering("quantize_panels")
def _quantize_panels(c):
    from tvm import te, tirx
    (w,) = c.xs
    width, group, n = c.attrs["width"], c.attrs["interleave"], int(w.shape[1])
    dtype, offset = INT8_STORAGE[group]
    scales = te_column_scales(w, f"{c.name}_scales")

    def at(p, q, col, j):
        column = tirx.min(p * width + col, n - 1)
        v = te_quantized(w[q * group + j, column].astype("float32"), scales[column]).astype("int32")
        return tirx.Select(p * width + col < n, v + offset, tirx.const(0, "int32")).astype(dtype)
    return te.compute(c.shape, at, name=c.name)


def te_rows_quantized(x, name: str, dtype: str = "int8"):
    """(q, scale) of each row of TE tensor ``x`` (``quantized_rows``): q (..., K) as ``dtype`` (int8, or int16 for a
    kernel that multiplies 16-bit values) and the float32 scale (...)."""
    from tvm import te, tirx
    lead, k = tuple(x.shape[:-1]), te.reduce_axis((0, x.shape[-1]), name=f"{name}_k")
    amax = te.compute(lead, lambda *i: te.max(tirx.abs(x[i + (k,)].astype("float32")), axis=k), name=f"{name}_amax")
    scale = te.compute(lead, lambda *i: te_scale(amax[i]), name=f"{name}_scale")
    q = te.compute(tuple(x.shape), lambda *i: te_quantized(x[i].astype("float32"), scale[i[:-1]]).astype(dtype),
                   name=f"{name}_q")
    return q, scale


@lowering("linear_int8")
def _linear_int8(c):
    from tvm import te

    from ...lower.elementwise import ACTIVATIONS as EXPRS
    x, w, s = c.xs[:3]
    bias = c.xs[3] if len(c.xs) == 4 else None
    xq, sx = te_rows_quantized(x, c.name)
    k = te.reduce_axis((0, x.shape[-1]), name="k")
    offset = INT8_STORAGE[int(w.shape[3])][1]
    acc = te.compute(c.shape, lambda *i: te.sum(xq[i[:-1] + (k,)].astype("int32") * (
        _panel_at(w, k, i[-1]).astype("int32") - offset), axis=k), name=f"{c.name}_acc")
    act = EXPRS[c.attrs["activation"]]

    def value(*i):
        y = acc[i].astype("float32") * sx[i[:-1]] * s[i[-1]]
        return act(y + bias[i[-1]] if bias is not None else y)
    return te.compute(c.shape, value, name=c.name)
