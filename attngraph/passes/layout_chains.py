"""Chains of reshapes and transposes, as other code bases spell them, brought to the fewest copies.

PyTorch's ``nn.MultiheadAttention`` (batch-first) transposes its input to (seq, batch, width), splits the merged
projection with ``unflatten / unsqueeze / transpose / squeeze / select``, heads through ``(seq, batch*heads, dim)``
and back; a model written in the DSL reads ``reshape(x, (batch, seq, heads, dim)).transpose(1, 2)``.  Both mean
the same data movement.  Two rewrites take the first to the second:

- ``collapse``: a chain of reshapes, transposes and slices of whole leading factors is one index map.  Each
  axis of the chain's source is cut into factors (``atoms``: 3 x width, heads x dim) as the chain's reshapes
  split it; the chain is then the atoms permuted and grouped, emitted as at most a slice, a reshape, a transpose
  and a reshape (each only where it is not the identity), when that is fewer ops than the chain.
- ``commute``: a reshape or transpose that leaves the last axis whole commutes with a row-wise op (a projection
  ``x @ W``, a bias, a norm over the last axis, an elementwise function): it is moved past a run of them when
  that brings it next to another layout op, so the two collapse.  Sunk when it is above the run, hoisted when it
  is below.
"""

from __future__ import annotations

from ..ir import Graph
from ..ir import dims as D
from .memory import weights_only
from .rewrite import remove_dead

LAYOUT_OPS = ("reshape", "transpose", "slice")
#: elementwise functions of one data operand
UNARY = ("relu", "gelu", "silu", "sigmoid", "tanh", "exp", "neg", "erf", "sqrt", "rsqrt", "abs", "cast")


def _same(a, b) -> bool:
    return D.canonical(a) == D.canonical(b)


def _canonical(shape) -> tuple:
    return tuple(D.canonical(d) for d in shape)


class Atoms:
    """A chain's index map: the source's axes cut into factors (atoms), and the chain's current axes as groups
    of atoms, major first (a factor of size 1, or an axis of size 1, holds no data and is left out of the
    reshapes).  ``reshape``, ``transpose`` and ``slice`` follow one op each, returning False where the map leaves
    this form: a reshape that cuts across a factor it cannot split, a slice inside a factor or of an inner one."""

    def __init__(self, shape):
        self.size: dict[int, object] = {}
        self.start: dict[int, int] = {}  # a sliced atom -> its offset in the source
        self.source = [[self._new(d)] if not _same(d, 1) else [] for d in shape]  # source axis -> its atoms
        self.groups = [list(a) for a in self.source]

    def _new(self, size) -> int:
        atom = len(self.size)
        self.size[atom] = D.canonical(size)
        return atom

    def _data(self, atoms) -> list[int]:
        return [a for a in atoms if not _same(self.size[a], 1)]

    def _split(self, atom: int, major) -> tuple[int, int]:
        """Cut ``atom`` into (major, minor) factors, everywhere it appears."""
        minor = D.divide(self.size[atom], major)
        a, b = self._new(major), self._new(minor)
        for lists in (self.source, self.groups):
            for axis in lists:
                if atom in axis:
                    i = axis.index(atom)
                    axis[i:i + 1] = [a, b]
        return a, b

    def reshape(self, shape) -> bool:
        flat = self._data(a for g in self.groups for a in g)
        groups, i = [], 0
        for d in shape:
            group, prod = [], 1
            while not _same(prod, d):
                if i == len(flat):
                    return False
                a = flat[i]
                if D.divide(d, D.mul(prod, self.size[a])) is not None:
                    group.append(a)
                    prod = D.mul(prod, self.size[a])
                    i += 1
                    continue
                need = D.divide(d, prod)
                if need is None or _same(need, 1) or a in self.start or D.divide(self.size[a], need) is None:
                    return False
                flat[i:i + 1] = self._split(a, need)
            groups.append(group)
        if i != len(flat):
            return False
        self.groups = groups
        return True

    def transpose(self, perm) -> bool:
        self.groups = [self.groups[p] for p in perm]
        return True

    def slice(self, axis: int, start, stop, step) -> bool:
        group = self._data(self.groups[axis])
        if step != 1 or not (isinstance(start, int) and isinstance(stop, int)):
            return False
        if not group:  # an axis of size 1
            return (start, stop) == (0, 1)
        inner = D.product(self.size[a] for a in group[1:])
        lo, hi = D.divide(start, inner) if start else 0, D.divide(stop, inner)
        head = group[0]
        if not (isinstance(lo, int) and isinstance(hi, int)) or self._axis_of(head)[0] != head:
            return False  # inside a factor, or of an inner factor of its source axis: strided, not one slice
        self.start[head] = self.start.get(head, 0) + lo
        self.size[head] = hi - lo
        return True

    def _axis_of(self, atom: int) -> list[int]:
        return next(s for s in self.source if atom in s)

    def emit(self, g: Graph, x: int, out_shape, meta) -> tuple[int, int]:
        """(node, ops added): the chain from ``x`` as a slice of each source axis whose leading factor was
        sliced, a reshape to the factors, one transpose and a reshape to the result, each only where needed."""
        ops = 0
        for axis, atoms in enumerate(self.source):
            head = atoms[0] if atoms else None
            if head not in self.start:  # only a source axis' leading factor is ever sliced
                continue
            inner = D.product(self.size[a] for a in atoms[1:])
            start = D.mul(self.start[head], inner)
            stop = D.add(start, D.mul(self.size[head], inner))
            x = g.add("slice", [x], {"axis": axis, "start": start, "stop": stop, "step": 1}, name="slice", meta=meta)
            ops += 1
        order = self._data(a for atoms in self.source for a in atoms)
        perm = tuple(order.index(a) for a in self._data(a for grp in self.groups for a in grp))
        if perm != tuple(range(len(perm))):  # (without a transpose, the reshape below is the only one)
            if _canonical(g.node(x).type.shape) != tuple(self.size[a] for a in order):
                x = g.add("reshape", [x], {"shape": tuple(self.size[a] for a in order)}, name="reshape", meta=meta)
                ops += 1
            x = g.add("transpose", [x], {"perm": perm}, name="transpose", meta=meta)
            ops += 1
        if _canonical(g.node(x).type.shape) != _canonical(out_shape):
            x = g.add("reshape", [x], {"shape": tuple(out_shape)}, name="reshape", meta=meta)
            ops += 1
        return x, ops


def _chain(g: Graph, end: int) -> tuple[int, list[int]]:
    """(source, [layout ops from the source's user to ``end``]): the run of reshapes, transposes and slices
    that ends at ``end``."""
    chain = [end]
    x = g.operands(end)[0]
    while g.node(x).op in LAYOUT_OPS:
        chain.append(x)
        x = g.operands(x)[0]
    return x, chain[::-1]


def collapse(g: Graph) -> int:
    """Each chain of layout ops whose end is read by something else than a layout op, in canonical form where
    that is fewer ops.  Returns the chains rewritten."""
    done = 0
    for nid in g.topo_order():
        if nid not in g or g.node(nid).op not in LAYOUT_OPS:
            continue
        if g.users(nid) and all(g.node(u).op in LAYOUT_OPS for u in g.users(nid)) and not g.is_output(nid):
            continue  # not the end of a chain
        x, chain = _chain(g, nid)
        if len(chain) < 2 and not (g.node(nid).op == "transpose" and
                                   g.node(nid).attrs["perm"] == tuple(range(len(g.node(nid).attrs["perm"])))):
            continue
        atoms = Atoms(g.node(x).type.shape)
        ok = True
        for c in chain:
            n = g.node(c)
            if n.op == "reshape":
                ok = atoms.reshape(n.type.shape)
            elif n.op == "transpose":
                ok = atoms.transpose(n.attrs["perm"])
            else:
                axis = n.attrs["axis"] % n.type.rank
                ok = atoms.slice(axis, n.attrs["start"], n.attrs["stop"], n.attrs.get("step", 1))
            if not ok:
                break
        if not ok:
            continue
        first = g._next_id
        new, ops = atoms.emit(g, x, g.node(nid).type.shape, dict(g.node(nid).meta))
        if ops >= len(chain):  # not fewer ops: the chain stays, what was added goes
            for added in range(g._next_id - 1, first - 1, -1):
                if added in g and not g.users(added):
                    g.remove(added)
            continue
        g.replace_all_uses(nid, new)
        done += 1
    remove_dead(g)
    return done


# -- moving a layout op past row-wise ops ------------------------------------------------------------------

def _keeps_last(g: Graph, nid: int) -> bool:
    """A transpose or reshape that leaves the last axis whole and last."""
    n = g.node(nid)
    if n.op == "transpose":
        return n.attrs["perm"][-1] == n.type.rank - 1
    if n.op == "reshape":
        src = g.node(g.operands(nid)[0]).type
        return src.rank >= 1 and n.type.rank >= 1 and _same(src.shape[-1], n.type.shape[-1])
    return False


def _row_wise(g: Graph, nid: int, constant: set) -> int | None:
    """The position of the data operand of a row-wise op (each row of the result from the same row of it alone,
    the other operands weights or constants shared by every row), else None."""
    n, ops = g.node(nid), g.operands(nid)
    data = None
    if n.op in UNARY:
        data = 0
    elif n.op == "matmul" and ops[1] in constant and g.node(ops[1]).type.rank == 2:
        data = 0
    elif n.op in ("add", "sub", "mul", "div") and len(ops) == 2:
        data = next((i for i in (0, 1) if ops[1 - i] in constant and g.node(ops[1 - i]).type.rank <= 1), None)
    elif n.op in ("layer_norm", "rms_norm") and all(o in constant and g.node(o).type.rank == 1 for o in ops[1:]):
        data = 0
    if data is None or ops[data] in constant:
        return None
    x = g.node(ops[data]).type
    return data if x.rank == n.type.rank and tuple(x.shape[:-1]) == tuple(n.type.shape[:-1]) else None


def _again(g: Graph, nid: int, data: int, x: int) -> int:
    """Node ``nid``'s op with its data operand (at ``data``) replaced by ``x``."""
    n = g.node(nid)
    ops = list(g.operands(nid))
    ops[data] = x
    return g.add(n.op, ops, dict(n.attrs), name=n.op, meta=dict(n.meta))


def _layout_of(g: Graph, layout: int, x: int) -> int:
    """The layout op ``layout`` applied to ``x`` (whose last axis may differ in size from its operand's)."""
    n = g.node(layout)
    attrs = dict(n.attrs)
    if n.op == "reshape":
        attrs["shape"] = tuple(n.type.shape[:-1]) + (g.node(x).type.shape[-1],)
    return g.add(n.op, [x], attrs, name=n.op, meta=dict(n.meta))


def commute(g: Graph) -> int:
    """Hoist a last-axis-keeping layout op above the row-wise ops it reads when another layout op feeds them;
    sink one below the row-wise ops that read it when another layout op reads them.  Returns the moves."""
    moved = 0
    constant = weights_only(g)
    for nid in g.topo_order():  # hoist
        if nid not in g or not _keeps_last(g, nid):
            continue
        run, cur = [], g.operands(nid)[0]
        while cur not in constant and [u for u, _ in g.uses(cur)] == [run[-1][0] if run else nid] \
                and not g.is_output(cur) and (data := _row_wise(g, cur, constant)) is not None:
            run.append((cur, data))
            cur = g.operands(cur)[data]
            if g.node(cur).op in LAYOUT_OPS:
                break
        if not run or g.node(cur).op not in LAYOUT_OPS:
            continue
        y = _layout_of(g, nid, cur)
        for r, data in reversed(run):
            y = _again(g, r, data, y)
        g.replace_all_uses(nid, y)
        remove_dead(g)
        moved += 1
    constant = weights_only(g)
    for nid in g.topo_order():  # sink
        if nid not in g or not _keeps_last(g, nid) or g.node(g.operands(nid)[0]).op in LAYOUT_OPS:
            continue
        run, cur = [], nid
        while len(g.uses(cur)) == 1 and not g.is_output(cur):
            user, index = g.uses(cur)[0]
            data = _row_wise(g, user, constant)
            if data is None or data != index:
                break
            run.append((user, data))
            cur = user
        users = g.users(cur)
        if not run or len(users) != 1 or g.node(users[0]).op not in LAYOUT_OPS or g.is_output(cur):
            continue
        y = g.operands(nid)[0]
        for r, data in run:
            y = _again(g, r, data, y)
        g.replace_all_uses(cur, _layout_of(g, nid, y))
        remove_dead(g)
        moved += 1
    return moved


def layout_chains(g: Graph):
    """``commute`` and ``collapse`` until neither changes the graph (a few rounds).  Returns (rewrites, misses)."""
    total = 0
    for _ in range(6):
        step = commute(g) + collapse(g)
        total += step
        if not step:
            break
    return total, []
