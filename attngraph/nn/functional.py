"""Functions over traced tensors (``import attngraph.nn.functional as F``)."""

from __future__ import annotations

import builtins
import math
from typing import Sequence

import numpy as np

from ..ir.dims import Dim
from .tensor import Tensor, as_tensor, current_tracer, where  # noqa: F401  (where: F.where)


def _emit(op, operands, **attrs) -> Tensor:
    ts = [as_tensor(o) for o in operands]
    return current_tracer().emit(op, ts, attrs)


def softmax(x, axis: int = -1, *, dim: int | None = None) -> Tensor:
    """Softmax along ``axis`` (``dim=``, PyTorch's spelling, works too)."""
    return _emit("softmax", [x], axis=axis if dim is None else dim)


def log_softmax(x, axis: int = -1, *, dim: int | None = None) -> Tensor:
    return _emit("log_softmax", [x], axis=axis if dim is None else dim)


def _normalized_shape(name: str, x, normalized_shape) -> int:
    """PyTorch's ``normalized_shape`` argument, which must name the last axis (what the norms here normalize):
    its size."""
    from .tensor import TraceError, _user_location
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) != 1 or shape[0] != as_tensor(x).shape[-1]:
        raise TraceError(f"{name}(normalized_shape={shape}) of {as_tensor(x).type} at {_user_location()}: only the "
                         f"last axis is normalized here; give ({as_tensor(x).shape[-1]},)")
    return shape[0]


def _torch_form(args, kwargs) -> bool:
    """Whether a norm was called with PyTorch's signature (``normalized_shape`` second)."""
    return "normalized_shape" in kwargs or bool(args) and isinstance(args[0], (int, tuple, list))


def layer_norm(x, *args, **kwargs) -> Tensor:
    """Layer norm over the last axis: ``layer_norm(x, weight, bias, eps=1e-5)``, or PyTorch's
    ``layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5)``."""
    if _torch_form(args, kwargs):
        def torch_signature(normalized_shape, weight=None, bias=None, eps=1e-5):
            d = _normalized_shape("layer_norm", x, normalized_shape)
            return (weight if weight is not None else const(np.ones(d), as_tensor(x).dtype),
                    bias if bias is not None else const(np.zeros(d), as_tensor(x).dtype), eps)
        weight, bias, eps = torch_signature(*args, **kwargs)
    else:
        def our_signature(weight, bias, eps=1e-5):
            return weight, bias, eps
        weight, bias, eps = our_signature(*args, **kwargs)
    return _emit("layer_norm", [x, weight, bias], eps=float(eps))


def rms_norm(x, *args, **kwargs) -> Tensor:
    """x / sqrt(mean(x**2) + eps) * weight over the last axis: ``rms_norm(x, weight, eps=1e-6)``, or PyTorch's
    ``rms_norm(x, normalized_shape, weight=None, eps=None)`` (eps None: the machine epsilon of x's type)."""
    if _torch_form(args, kwargs):
        def torch_signature(normalized_shape, weight=None, eps=None):
            d = _normalized_shape("rms_norm", x, normalized_shape)
            if eps is None:
                eps = float(np.finfo(np.float64 if as_tensor(x).dtype == "float64" else np.float32).eps)
            return (weight if weight is not None else const(np.ones(d), as_tensor(x).dtype)), eps
        weight, eps = torch_signature(*args, **kwargs)
    else:
        def our_signature(weight, eps=1e-6):
            return weight, eps
        weight, eps = our_signature(*args, **kwargs)
    return _emit("rms_norm", [x, weight], eps=float(eps))


def cross_entropy(input, target, label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                  log_probs: bool = False) -> Tensor:
    """``torch.nn.functional.cross_entropy``: ``input`` holds scores (log-probabilities with ``log_probs``)
    with the classes along axis 1 as in PyTorch ((N, C), or (N, C, d1, ...) for targets (N, d1, ...)); one
    ``cross_entropy`` per position, then their mean over the positions whose target is not
    ``ignore_index`` (``reduction="sum"``: their sum; ``"none"``: each)."""
    from .tensor import TraceError, _user_location
    input = as_tensor(input)
    if input.ndim > 2:  # classes along axis 1 -> last, where the op reads them
        input = input.permute(0, *range(2, input.ndim), 1)
    if not 0.0 <= label_smoothing <= 1.0:
        raise TraceError(f"cross_entropy at {_user_location()}: label_smoothing {label_smoothing} is not in [0, 1]")
    if reduction not in ("mean", "sum", "none"):
        raise TraceError(f"cross_entropy at {_user_location()}: reduction {reduction!r} is not mean, sum or none")
    per = _emit("cross_entropy", [input, target], label_smoothing=float(label_smoothing),
                ignore_index=int(ignore_index), log_probs=bool(log_probs))
    if reduction == "none":
        return per
    total = per.sum()
    if reduction == "sum":
        return total
    target = as_tensor(target)
    return total / target.ne(ignore_index).astype(per.dtype).sum()


def dropout(x, p: float = 0.5, training: bool = True) -> Tensor:
    """``torch.nn.functional.dropout``: in training, each element zeroed with probability ``p`` and the rest
    scaled by 1 / (1 - p); otherwise ``x``.  The elements dropped follow from the graph input
    ``dropout_seed`` (one per step; the first dropout makes it) and the site, the same on every target."""
    from .tensor import TraceError, _user_location
    if not 0.0 <= p <= 1.0:
        raise TraceError(f"dropout at {_user_location()}: p {p} is not in [0, 1]")
    x = as_tensor(x)
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    seed, salt = current_tracer().dropout_seed()
    return _emit("dropout", [x, seed], p=float(p), salt=salt)


def nll_loss(input, target, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """``torch.nn.functional.nll_loss``: ``cross_entropy`` of log-probabilities (classes along axis 1)."""
    return cross_entropy(input, target, ignore_index=ignore_index, reduction=reduction, log_probs=True)


def gelu(x, approximate: str = "none") -> Tensor:
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return _emit("gelu", [x], approximate=approximate)


def relu(x) -> Tensor: return _emit("relu", [x])
def sigmoid(x) -> Tensor: return _emit("sigmoid", [x])
def silu(x) -> Tensor: return _emit("silu", [x])
def erf(x) -> Tensor: return _emit("erf", [x])
def tanh(x) -> Tensor: return _emit("tanh", [x])
def exp(x) -> Tensor: return _emit("exp", [x])
def log(x) -> Tensor: return _emit("log", [x])
def sqrt(x) -> Tensor: return _emit("sqrt", [x])
def rsqrt(x) -> Tensor: return _emit("rsqrt", [x])
def sin(x) -> Tensor: return _emit("sin", [x])
def cos(x) -> Tensor: return _emit("cos", [x])


def matmul(a, b) -> Tensor:
    return _emit("matmul", [a, b])


def concat(xs: Sequence, axis: int) -> Tensor:
    return _emit("concat", list(xs), axis=axis)


def cat(tensors: Sequence, dim: int = 0) -> Tensor:
    """``torch.cat``: ``tensors`` joined along ``dim``."""
    return concat(tensors, dim)


def stack(tensors: Sequence, dim: int = 0) -> Tensor:
    """``torch.stack``: ``tensors`` (of one shape) joined along a new axis ``dim``."""
    tensors = [as_tensor(t) for t in tensors]
    rank = tensors[0].ndim + 1
    tensors[0]._check_axes("stack", (dim,), rank)
    return concat([t.unsqueeze(dim % rank) for t in tensors], dim % rank)


# PyTorch's tensor functions, as the methods of the same name (``torch.flatten(x, 1)`` is ``x.flatten(1)``)
def flatten(x, start_dim: int = 0, end_dim: int = -1) -> Tensor: return as_tensor(x).flatten(start_dim, end_dim)
def split(x, split_size_or_sections, dim: int = 0): return as_tensor(x).split(split_size_or_sections, dim)
def chunk(x, chunks: int, dim: int = 0): return as_tensor(x).chunk(chunks, dim)
def repeat_interleave(x, repeats, dim=None) -> Tensor: return as_tensor(x).repeat_interleave(repeats, dim)
def triu(x, diagonal: int = 0) -> Tensor: return as_tensor(x).triu(diagonal)
def tril(x, diagonal: int = 0) -> Tensor: return as_tensor(x).tril(diagonal)
def abs(x) -> Tensor: return as_tensor(x).abs()  # noqa: A001 - torch.abs
def pow(x, exponent) -> Tensor: return as_tensor(x) ** exponent  # noqa: A001 - torch.pow
def clamp(x, min=None, max=None) -> Tensor: return as_tensor(x).clamp(min, max)  # noqa: A002
def minimum(a, b) -> Tensor: return as_tensor(a).minimum(b)
def maximum(a, b) -> Tensor: return as_tensor(a).maximum(b)
def argmax(x, dim=None, keepdim: bool = False) -> Tensor: return as_tensor(x).argmax(dim, keepdim)
def embedding(input, weight) -> Tensor:  # noqa: A002 - PyTorch's names
    """``torch.nn.functional.embedding``: the rows of ``weight`` at the ids ``input``."""
    return gather(weight, input)


def _extreme(reduce: str, input, other, keepdim: bool):
    x = as_tensor(input)
    if other is None:
        return getattr(x, reduce)()
    if isinstance(other, (int, np.integer)) and not isinstance(other, bool):
        return getattr(x, reduce)(int(other), keepdim), getattr(x, f"arg{reduce}")(int(other), keepdim)
    return getattr(x, f"{reduce}imum")(other)


def min(input, other=None, keepdim: bool = False):  # noqa: A001, A002 - torch.min
    """``torch.min``: of every element (``other`` None), along dim ``other`` (an int: (values, indices)), or
    the elementwise minimum with tensor or number ``other``.  (This module's own code calls Python's as
    ``builtins.min``.)"""
    return _extreme("min", input, other, keepdim)


def max(input, other=None, keepdim: bool = False):  # noqa: A001, A002 - torch.max
    """``torch.max``: as ``min``, for the maximum."""
    return _extreme("max", input, other, keepdim)


def zeros_like(x) -> Tensor: return full_like(x, 0)
def ones_like(x) -> Tensor: return full_like(x, 1)


def full_like(x, fill_value) -> Tensor:
    """``fill_value`` at ``x``'s shape (symbolic dims too) and dtype (``torch.full_like``)."""
    x = as_tensor(x)
    return as_tensor(fill_value, like=x).expand(*x.shape) if x.ndim else as_tensor(fill_value, like=x)


def pad(x, pad: Sequence[int], mode: str = "constant", value: float = 0.0) -> Tensor:
    """``torch.nn.functional.pad`` in constant mode: ``pad`` = (left, right) of the last axis, then of the one
    before it, ...; each side ``value`` joined on (a negative amount cuts instead)."""
    from .tensor import TraceError, _user_location
    x = as_tensor(x)
    if mode != "constant":
        raise TraceError(f"pad(mode={mode!r}) at {_user_location()}: only mode='constant' is supported")
    pad = [int(p) for p in pad]
    if len(pad) % 2 or len(pad) // 2 > x.ndim:
        raise TraceError(f"pad({tuple(pad)}) of {x.type} at {_user_location()}: give (left, right) pairs for at most "
                         f"{x.ndim} axes")
    for i in range(len(pad) // 2):
        axis, (left, right) = x.ndim - 1 - i, pad[2 * i:2 * i + 2]
        size = x.shape[axis]
        if left < 0 or right < 0:  # cut
            if right < 0 and not isinstance(size, int):
                raise TraceError(f"pad({tuple(pad)}) at {_user_location()}: a negative pad at the end of symbolic "
                                 f"axis {axis} ({size})")
            x = x[(slice(None),) * axis + (slice(builtins.max(-left, 0), size + right if right < 0 else None),)]
        before, after = ([as_tensor(value, like=x).expand(*[amount if a == axis else d for a, d in enumerate(x.shape)])]
                         if amount > 0 else [] for amount in (left, right))
        if before or after:
            x = concat(before + [x] + after, axis)
    return x


def normalize(x, p: float = 2.0, dim: int = 1, eps: float = 1e-12) -> Tensor:
    """``torch.nn.functional.normalize``: ``x / max(||x||_p, eps)`` along ``dim``."""
    x = as_tensor(x)
    if p == 2:
        norm = (x * x).sum(dim, keepdims=True).sqrt()
    elif p == 1:
        norm = x.abs().sum(dim, keepdims=True)
    else:
        norm = (x.abs() ** p).sum(dim, keepdims=True) ** (1.0 / p)
    return x / norm.clamp(min=eps)


def gather(table, indices) -> Tensor:
    """``table[indices]`` along axis 0 (an embedding lookup)."""
    return _emit("gather", [table, indices])


def cast(x, dtype: str) -> Tensor:
    return _emit("cast", [x], dtype=dtype)


def arange(n: Dim, dtype: str = "int64") -> Tensor:
    """0..n-1; ``n`` may be a symbolic dim such as ``x.shape[1]``."""
    return current_tracer().emit("arange", (), {"n": n, "dtype": dtype})


def const(value, dtype: str | None = None, name: str | None = None) -> Tensor:
    """A constant of type ``dtype`` (default: the value's, float64 taken as float32); a float value is held in
    float64 (``tensor.const_attrs``)."""
    from .tensor import const_attrs
    return current_tracer().emit("const", (), const_attrs(value, dtype), name=name)


def update_slice(cache, value, offset, axis: int) -> Tensor:
    """``cache`` with ``value`` written at ``offset`` (an int64 scalar tensor) along ``axis``."""
    return _emit("update_slice", [cache, value, offset], axis=axis)


def causal_mask(q_len, k_len, offset=None) -> Tensor:
    """True where query i may attend key j: j <= i (+ offset, the number of earlier positions)."""
    q = arange(q_len)
    if offset is not None:
        q = q + offset
    return arange(k_len)[None, :] <= q[:, None]


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """``softmax(query @ keyᵀ · scale + mask) @ value`` over the last two axes, as PyTorch's
    ``torch.nn.functional.scaled_dot_product_attention`` (without dropout): ``scale`` defaults to
    1/sqrt(head dim); a bool ``attn_mask`` is True where a query may attend a key, a float one is
    added to the scores; ``is_causal``: query i attends keys 0..i.  Written as the plain ops, which
    the optimizer fuses (``-O3``: one ``fused_attention``).  ``enable_gqa``: key and value with fewer heads
    (a divisor of the query's), each serving that many query heads in a row (read in place at -O3)."""
    query, key, value = as_tensor(query), as_tensor(key), as_tensor(value)
    if dropout_p:
        raise ValueError("scaled_dot_product_attention: dropout_p is not supported (an inference graph; 0.0)")
    if enable_gqa and key.ndim >= 3 and query.shape[-3] != key.shape[-3]:
        heads, kv_heads = query.shape[-3], key.shape[-3]
        if not (isinstance(heads, int) and isinstance(kv_heads, int) and heads % kv_heads == 0):
            raise ValueError(f"scaled_dot_product_attention: enable_gqa needs the key's heads ({kv_heads}) to divide "
                             f"the query's ({heads})")
        key = key.repeat_interleave(heads // kv_heads, dim=-3)
        value = value.repeat_interleave(heads // kv_heads, dim=-3)
    head_dim = query.shape[-1]
    if scale is None:
        if not isinstance(head_dim, int):
            raise ValueError(f"scaled_dot_product_attention: the head dim {head_dim!r} is symbolic; give scale=")
        scale = 1.0 / math.sqrt(head_dim)
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: give attn_mask or is_causal, not both (as PyTorch)")
    scores = (query @ key.transpose(-2, -1)) * float(scale)
    if attn_mask is not None:
        mask = as_tensor(attn_mask)
        scores = where(mask, scores, float("-inf")) if mask.dtype == "bool" else scores + mask
    if is_causal:
        scores = where(causal_mask(query.shape[-2], key.shape[-2]), scores, float("-inf"))
    return softmax(scores, axis=-1) @ value


def einsum(equation: str, *operands) -> Tensor:
    """``torch.einsum`` / ``np.einsum`` for one or two operands, written as the transposes, reshapes,
    sums and one batched ``matmul`` it stands for (so ``einsum("bhqd,bhkd->bhqk", q, k)`` is
    ``q @ k.transpose(-2, -1)``, and the attention passes see the same ops).  Letters, an optional
    ``...`` for leading dims, an explicit or implicit output; a letter repeated within one operand (a
    diagonal) is not supported."""
    from .tensor import TraceError, _user_location
    ts = [as_tensor(o) for o in operands]
    where = f"einsum({equation!r}) at {_user_location()}"
    lhs, arrow, out = equation.replace(" ", "").partition("->")
    inputs = lhs.split(",")
    if len(inputs) != len(ts) or len(ts) not in (1, 2):
        raise TraceError(f"{where}: {len(inputs)} operand spec(s) for {len(ts)} operand(s); one or two are supported")
    specs = [_expand_ellipsis(s, t.ndim, where) for s, t in zip(inputs, ts)]
    if arrow:
        out = _expand_ellipsis(out, builtins.max(len(s) for s in specs) if "..." in out else len(out.replace("...", "")),
                               where, specs)
    else:  # implicit: the ellipsis dims, then the letters used once, in alphabetical order
        letters = "".join(specs)
        out = "".join(c for c in _ELLIPSIS if c in letters) + "".join(
            sorted(c for c in set(letters) if letters.count(c) == 1 and c not in _ELLIPSIS))
    for s in specs + [out]:
        if len(set(s)) != len(s):
            raise TraceError(f"{where}: a letter repeated within {s!r} (a diagonal) is not supported")
    for s, t in zip(specs, ts):
        if len(s) != t.ndim:
            raise TraceError(f"{where}: {s!r} names {len(s)} axes of a tensor of rank {t.ndim} ({t.type})")
    unknown = set(out) - set("".join(specs))
    if unknown:
        raise TraceError(f"{where}: output letter(s) {''.join(sorted(unknown))} appear in no operand")
    # letters no one else reads are summed out first
    for i, (s, t) in enumerate(zip(specs, ts)):
        others = set(out).union(*(set(o) for j, o in enumerate(specs) if j != i))
        gone = [a for a, c in enumerate(s) if c not in others]
        if gone:
            ts[i] = t.sum(gone)
            specs[i] = "".join(c for c in s if c in others)
    if len(ts) == 1:
        return _permute_to(ts[0], specs[0], out)
    (a, b), (sa, sb) = ts, specs
    batch = [c for c in out if c in sa and c in sb]
    free_a = [c for c in sa if c not in sb]
    free_b = [c for c in sb if c not in sa]
    contracted = [c for c in sa if c in sb and c not in out]
    sizes = {c: d for s, t in zip(specs, ts) for c, d in zip(s, t.shape) if d != 1}
    a = _group(_permute_to(a, sa, "".join(batch + free_a + contracted)), len(batch), [free_a, contracted], sizes)
    b = _group(_permute_to(b, sb, "".join(batch + contracted + free_b)), len(batch), [contracted, free_b], sizes)
    product = a @ b
    lead = list(product.shape[:len(batch)])
    full = product.reshape(lead + [sizes.get(c, 1) for c in free_a + free_b]) if len(free_a) != 1 or len(free_b) != 1 \
        else product
    return _permute_to(full, "".join(batch + free_a + free_b), out)


#: Letters standing for the dims of ``...`` (not letters a user writes: they are not ASCII).
_ELLIPSIS = "αβγδεζηθικλμ"


def _expand_ellipsis(spec: str, rank: int, where: str, others=()) -> str:
    if "..." not in spec:
        return spec
    n = rank - len(spec.replace("...", ""))
    if others:  # the output: as many ellipsis dims as the widest operand has
        n = builtins.max((builtins.sum(c in _ELLIPSIS for c in o) for o in others), default=0)
    if n < 0:
        from .tensor import TraceError
        raise TraceError(f"{where}: {spec!r} names more axes than the tensor's {rank}")
    return spec.replace("...", _ELLIPSIS[len(_ELLIPSIS) - n:] if n else "")


def _permute_to(t, spec: str, target: str):
    perm = [spec.index(c) for c in target]
    return t if perm == list(range(len(perm))) else t.permute(perm)


def _group(t, n_batch: int, groups, sizes):
    """``t`` (batch dims, then the dims of each group in turn) reshaped to one dim per group, where a
    group is not one dim already (symbolic dims multiply: ``batch*seq``)."""
    if all(len(g) == 1 for g in groups):
        return t
    from ..ir import dims as D
    return t.reshape(list(t.shape[:n_batch]) + [D.product(sizes.get(c, 1) for c in g) for g in groups])
