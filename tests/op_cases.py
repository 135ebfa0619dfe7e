"""One case per op of the registry (and per form worth its own kernel): (op, attrs, operand types) with
symbolic dims b and s, and the operands to run them with.  The TVM op tests run every case on every
target; the derivative tests check every differentiable one against finite differences."""

from __future__ import annotations

import numpy as np

from attngraph.ir import TensorType
from attngraph.ir import dims as D

SIZES = ({"b": 1, "s": 1}, {"b": 3, "s": 7})


def T(*shape, dtype="float32"):
    return TensorType(shape, dtype)


BOOL, I64 = "bool", "int64"
X = T("b", "s", 8)

#: q, k, v, d out, lse, delta of the attention's gradient ops: self-attention with a value head dim of its own,
#: and a cross-attention (5 keys) whose k and v are one batch's, and whose q, k and so lse have one head for all
ATTENTION_GRAD = [T("b", 2, "s", 4), T("b", 2, "s", 4), T("b", 2, "s", 3), T("b", 2, "s", 3), T("b", 2, "s"), T("b", 2, "s")]
CROSS_ATTENTION_GRAD = [T("b", 1, "s", 4), T(1, 1, 5, 4), T(1, 2, 5, 4), T("b", 2, "s", 4), T("b", 1, "s"), T("b", 2, "s")]

# (op, attrs, operand types).  The ids name the op and a hint of the case.
CASES = [
    ("neg", {}, [X]), ("exp", {}, [X]), ("log", {}, [X]), ("sqrt", {}, [X]), ("rsqrt", {}, [X]),
    ("tanh", {}, [X]), ("erf", {}, [X]), ("sin", {}, [X]), ("cos", {}, [X]), ("relu", {}, [X]), ("sigmoid", {}, [X]), ("silu", {}, [X]),
    ("gelu", {}, [X]), ("gelu", {"approximate": "tanh"}, [X]),
    ("cast", {"dtype": "float32"}, [T("b", "s", 8, dtype=BOOL)]), ("cast", {"dtype": "float64"}, [X]),
    ("add", {}, [X, T(8)]), ("sub", {}, [X, T("b", 1, 8)]), ("mul", {}, [X, T()]), ("div", {}, [X, T("s", 1)]),
    ("maximum", {}, [X, X]), ("minimum", {}, [X, T("s", 1)]), ("pow", {}, [X, T(8)]), ("abs", {}, [X]),
    ("eq", {}, [T("b", "s", dtype=I64), T(dtype=I64)]), ("ne", {}, [X, X]), ("lt", {}, [X, T(8)]),
    ("le", {}, [X, X]), ("gt", {}, [X, T()]), ("ge", {}, [X, X]),
    ("logical_and", {}, [T("b", "s", dtype=BOOL), T("s", dtype=BOOL)]),
    ("logical_or", {}, [T("b", "s", dtype=BOOL), T("b", "s", dtype=BOOL)]),
    ("logical_not", {}, [T("b", "s", dtype=BOOL)]),
    ("where", {}, [T("b", 1, 8, dtype=BOOL), X, T()]),
    ("matmul", {}, [X, T(8, 12)]),
    ("matmul", {}, [T("b", 2, "s", 4), T("b", 2, 4, "s")]),
    ("matmul", {}, [T("b", 2, "s", "s"), T("b", 2, "s", 4)]),
    ("matmul", {}, [T("s", 8), T(8, "s")]),
    ("weight_grad", {}, [X, T("b", "s", 12)]), ("weight_grad", {}, [T("s", 12), T("s", 20)]),
    ("linear", {}, [X, T(8, 12)]), ("linear", {"activation": "relu"}, [X, T(8, 12), T(12)]),
    ("linear", {"activation": "gelu"}, [X, T(8, 5), T(5)]), ("linear", {"activation": "gelu_tanh"}, [X, T(8, 4), T(4)]),
    ("softmax", {}, [X]), ("softmax", {"axis": 1}, [X]), ("log_softmax", {}, [X]),
    ("layer_norm", {"eps": 1e-5}, [X, T(8), T(8)]),
    ("add_layer_norm", {"eps": 1e-6}, [X, X, T(8), T(8)]),
    ("layer_norm_grad", {"eps": 1e-5}, [X, T(8), X]),
    ("rms_norm", {"eps": 1e-6}, [X, T(8)]), ("add_rms_norm", {"eps": 1e-5}, [X, T("s", 8), T(8)]),
    ("scaled_masked_softmax", {"scale": 0.35}, [T("b", 2, "s", "s")]),
    ("scaled_masked_softmax", {"scale": 0.5, "mask_kinds": ("additive", "keep", "drop")},
     [T("b", 2, "s", "s"), T("b", 1, 1, "s"), T("s", "s", dtype=BOOL), T("b", 1, 1, "s", dtype=BOOL)]),
    ("fused_attention", {"scale": 0.5}, [T("b", 2, "s", 4)] * 3),
    # grouped-query attention: 4 query heads, 2 key/value heads (query head j reads head j // 2)
    ("fused_attention", {"scale": 0.5, "mask_kinds": ("keep",)}, [T("b", 4, "s", 4), T("b", 2, "s", 4),
                                                                  T("b", 2, "s", 4), T("s", "s", dtype=BOOL)]),
    ("fused_attention", {"scale": 0.5, "layout": "bshd"}, [T("b", "s", 6, 4), T("b", "s", 2, 4), T("b", "s", 2, 4)]),
    ("fused_attention", {"scale": 0.5, "mask_kinds": ("keep", "drop"), "layout": "bshd"},
     [T("b", "s", 2, 4)] * 3 + [T("s", "s", dtype=BOOL), T("b", 1, 1, "s", dtype=BOOL)]),
    ("fused_attention", {"scale": 0.3, "mask_kinds": ("additive",)},
     [T("b", 2, "s", 4), T("b", 2, 5, 4), T("b", 2, 5, 4), T("b", 1, 1, 5)]),
    # masked_fill(-1e9) and finfo.min fills; one key/value head for all query heads; queries shared by a batch
    ("scaled_masked_softmax", {"scale": 0.5, "mask_kinds": ("keep", "drop"), "mask_fills": (-1e9, -3.4e38)},
     [T("b", 2, "s", "s"), T("s", "s", dtype=BOOL), T("b", 1, 1, "s", dtype=BOOL)]),
    ("fused_attention", {"scale": 0.5, "mask_kinds": ("drop",), "mask_fills": (-1e9,)},
     [T("b", 2, "s", 4), T("b", 1, "s", 4), T("b", 1, "s", 4), T("b", 1, 1, "s", dtype=BOOL)]),
    ("fused_attention", {"scale": 0.5, "mask_kinds": ("keep",), "layout": "bshd"},
     [T(1, "s", 2, 4), T("b", "s", 2, 4), T("b", "s", 2, 4), T("s", "s", dtype=BOOL)]),
    ("fused_attention", {"layout": "bshd"}, [T("b", "s", 4, 1), T("b", "s", 1, 1), T("b", "s", 1, 3)]),
    # the attention's backward: row log-sum-exps, d q, d k and d v (masks; a cross-attention's other key length;
    # one key/value head or batch for all; a masked_fill(-1e9) fill)
    ("attention_lse", {"scale": 0.5}, [T("b", 2, "s", 4), T("b", 2, "s", 4)]),
    ("attention_lse", {"scale": 0.3, "mask_kinds": ("additive", "drop"), "mask_fills": (-np.inf, -1e9)},
     [T("b", 2, "s", 4), T(1, 2, 5, 4), T("b", 1, 1, 5), T("b", 1, 1, 5, dtype=BOOL)]),
    ("attention_grad_q", {"scale": 0.5, "mask_kinds": ("keep",)}, ATTENTION_GRAD + [T("s", "s", dtype=BOOL)]),
    ("attention_grad_q", {"scale": 0.3, "mask_kinds": ("additive", "drop"), "mask_fills": (-np.inf, -1e9)},
     CROSS_ATTENTION_GRAD + [T("b", 1, 1, 5), T("b", 1, 1, 5, dtype=BOOL)]),
    ("attention_grad_kv", {"scale": 0.5, "mask_kinds": ("keep",)}, ATTENTION_GRAD + [T("s", "s", dtype=BOOL)]),
    ("attention_grad_kv", {"scale": 0.3, "mask_kinds": ("additive", "drop"), "mask_fills": (-np.inf, -1e9)},
     CROSS_ATTENTION_GRAD + [T("b", 1, 1, 5), T("b", 1, 1, 5, dtype=BOOL)]),
    ("reduce_sum", {"axes": (-1,)}, [X]), ("reduce_mean", {"axes": (1,), "keepdims": True}, [X]),
    ("reduce_max", {"axes": (0, 2)}, [X]),
    ("transpose", {"perm": (0, 2, 1)}, [X]), ("transpose", {"perm": (1, 0, 2)}, [X]),
    ("reshape", {"shape": ("b", "s", 2, 4)}, [X]),
    ("slice", {"axis": 2, "start": 1, "stop": 7, "step": 2}, [X]), ("slice", {"axis": 1, "start": 0, "stop": 1}, [X]),
    ("slice", {"axis": 1, "start": 1, "stop": "s"}, [T("b", "s + 1", 8)]),
    ("concat", {"axis": 2}, [T("b", "s", 3), T("b", "s", 5)]), ("concat", {"axis": 1}, [X, T("b", 2, 8), X]),
    ("gather", {}, [T(10, 8), T("b", "s", dtype=I64)]),
    ("arange", {"n": "s"}, []),
    # the derivatives' ops: an embedding's gradient, a sum's spread, the training loss
    ("scatter_add", {}, [T("b", "s", dtype=I64), X, T(10, 8)]),
    ("scatter_add", {}, [T("s", dtype=I64), T("s", 32), T(10, 32)]),
    ("broadcast_like", {}, [T("s", 1), X]), ("broadcast_like", {}, [T(), T("b", "s")]),
    ("broadcast_to", {"shape": ("b", -1, 3, 8)}, [T("s", 1, 8)]), ("broadcast_to", {"shape": ("b", "s")}, [T()]),
    ("dropout", {"p": 0.3, "salt": 5}, [X, T(dtype=I64)]), ("dropout", {"p": 0.1, "salt": 1}, [T("b", "s"), T(dtype=I64)]),
    ("cross_entropy", {"label_smoothing": 0.1, "ignore_index": 0}, [X, T("b", "s", dtype=I64)]),
    ("cross_entropy", {"log_probs": True}, [X, T("b", "s", dtype=I64)]),
    ("update_slice", {"axis": 1}, [T("b", 16, 8), X, T(dtype=I64)]),
    # elementwise chains in one kernel (operands broadcast; steps read operands and earlier steps)
    ("fused_elementwise", {"program": (("mul", (0, 2), ()), ("add", (4, 1), ()), ("tanh", (5,), ()),
                                       ("where", (3, 6, 0), ()), ("gelu", (7,), (("approximate", "tanh"),)),
                                       ("maximum", (8, 4), ()))},
     [X, T(8), T(), T("b", 1, 8, dtype=BOOL)]),
    ("fused_elementwise", {"program": (("eq", (0, 1), ()), ("logical_not", (2,), ()),
                                       ("cast", (3,), (("dtype", "float32"),)))},
     [T("b", "s", dtype=I64), T(dtype=I64)]),
    # the llvm target's own ops (weights in column panels)
    ("pack_panels", {"width": 16}, [T(8, 20)]),
    ("linear_packed", {"n": 20, "activation": "relu"}, [X, T(2, 8, 16), T(20)]),
    ("swiglu_packed", {"n": 16}, [X, T(2, 8, 16), T(32)]),
    ("swiglu_packed", {"n": 16, "gate": 1}, [X, T(2, 8, 16)]),
    # and its int8 ones (a weight's scales and quantized panels; the projection over them)
    ("column_scales", {}, [T(8, 20)]),
    ("quantize_panels", {"width": 16}, [T(8, 20)]),
    ("linear_int8", {"n": 20, "activation": "relu"}, [X, T(2, 2, 16, 4, dtype="uint8"), T(20), T(20)]),
    ("quantize_panels", {"width": 16, "interleave": 2}, [T(8, 20)]),  # in pairs: vpmaddwd's layout
    ("linear_int8", {"n": 20, "activation": "none"}, [X, T(2, 4, 16, 2, dtype="int8"), T(20)]),
]
#: the 8-bit integer types of quantized values (which WGSL cannot store)
BYTES = ("int8", "uint8")


def case_id(case):
    op, attrs, types = case
    hint = ",".join(f"{k}={v}" for k, v in attrs.items() if k not in ("eps",))
    return f"{op}[{hint}]({';'.join(str(t) for t in types)})"


def operand(t: TensorType, op: str, sizes: dict, rng) -> np.ndarray:
    shape = tuple(D.evaluate(d, sizes) for d in t.shape)
    if t.dtype == BOOL:
        return rng.random(shape) < 0.4
    if t.dtype == I64:
        if op in ("gather", "scatter_add"):
            return rng.integers(0, 10, shape)
        if op == "cross_entropy":
            return rng.integers(0, 8, shape)
        if op == "update_slice":
            return np.array(3)
        if op == "dropout":  # a step's seed
            return np.array(rng.integers(0, 2 ** 31))
        return rng.integers(0, 3, shape)
    if t.dtype in BYTES:
        info = np.iinfo(t.dtype)
        return rng.integers(info.min, info.max + 1, shape).astype(t.dtype)
    x = rng.standard_normal(shape).astype(t.dtype)
    return np.abs(x) + 0.1 if op in ("log", "sqrt", "rsqrt", "pow") else x


def case_operands(case, attrs: dict, sizes: dict, rng) -> list[np.ndarray]:
    """The operands of ``case`` at ``sizes``; no fully masked score row (its softmax is NaN by definition):
    key 0 is always kept."""
    op, _, types = case
    args = [operand(t, op, sizes, rng) for t in types]
    first = {"scaled_masked_softmax": 1, "fused_attention": 3, "attention_lse": 2, "attention_grad_q": 6,
             "attention_grad_kv": 6}.get(op)
    if first is not None:
        for kind, j in zip(attrs["mask_kinds"], range(first, len(args))):
            if kind == "keep":
                args[j][..., 0] = True
            elif kind == "drop":
                args[j][..., 0] = False
    if first == 6:  # the row statistics of these q and k, so that the probabilities are probabilities
        from attngraph.ir.fused import attention_lse
        q, k = (a.astype(np.float64) for a in args[:2])
        lse = attention_lse(q, k, *args[6:], **{a: attrs[a] for a in ("scale", "mask_kinds", "mask_fills")})
        args[4] = lse.reshape(args[4].shape).astype(args[4].dtype)
    return args
