"""The pass manager: levels, per-pass statistics, printing the IR after a pass, and checking every
pass against the interpreter (``verify_each``) so that a pass that changes the result is named."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..ir import Graph, to_text
from ..numerics import same_nonfinite
from . import checkpoint as _checkpoint
from . import cleanup, fusion, layout_chains
from .memory import SOURCE_OPS, VIEW_OPS, activation_bytes, plan_memory, schedule_training, weights_only

#: name -> pass; a pass rewrites the graph in place and returns (matches, near-misses).
PASSES: dict[str, Callable] = {
    "dce": cleanup.dead_code,
    "cse": cleanup.common_subexpressions,
    "constant-fold": cleanup.constant_fold,
    "fold-transposes": cleanup.fold_transposes,
    "layout-chains": layout_chains.layout_chains,
    "softmax-by-hand": fusion.softmax_by_hand,
    "rms-norm-by-hand": fusion.rms_norm_by_hand,
    "softmax-scaling": fusion.softmax_scaling,
    "attention": fusion.attention,
    "broadcast-heads": fusion.broadcast_heads,
    "linear-epilogue": fusion.linear_epilogue,
    "residual-layer-norm": fusion.residual_layer_norm,
    "fold-scale-into-q": fusion.fold_scale_into_q,
    "merge-projections": fusion.merge_projections,
    "loss-of-log-softmax": fusion.loss_of_log_softmax,
    "slice-grads-to-concat": fusion.slice_grads_to_concat,
    "fuse-elementwise": fusion.fuse_elementwise,
    # not in a level: ``optimize(checkpoint=True)`` runs it last
    "checkpoint-layers": _checkpoint.checkpoint_layers,
}

LEVELS = {
    0: [],
    1: ["dce", "cse", "constant-fold"],
    2: ["dce", "cse", "constant-fold", "layout-chains", "softmax-by-hand", "rms-norm-by-hand", "softmax-scaling", "linear-epilogue", "residual-layer-norm",
        "loss-of-log-softmax"],
    # -O2 keeps the softmax scale in the kernel; -O3 folds it into the Q projection's weights.
    3: ["dce", "cse", "constant-fold", "layout-chains", "softmax-by-hand", "rms-norm-by-hand", "softmax-scaling", "attention", "broadcast-heads",
        "linear-epilogue", "residual-layer-norm", "fold-scale-into-q", "merge-projections", "loss-of-log-softmax",
        "slice-grads-to-concat", "fold-transposes", "fuse-elementwise"],
}


class PassVerificationError(AssertionError):
    """A pass changed the model's outputs (found by ``verify_each``)."""


class PassOptionError(ValueError):
    """An option of ``optimize`` names a pass that does not exist or does not run: ``option`` says which
    (``"passes"``, ``"disable"`` or ``"print_after"``)."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


@dataclass
class PassStat:
    name: str
    nodes_before: int
    nodes_after: int
    matches: int
    near_misses: list[str] = field(default_factory=list)
    ir_after: str | None = None

    @property
    def changed(self) -> bool:
        return self.matches > 0 or self.nodes_before != self.nodes_after


def kernel_count(g: Graph) -> int:
    """Ops that need a kernel at run time: everything but sources, views and weights-only values."""
    constant = weights_only(g)
    return sum(1 for n in g.nodes() if n.op not in SOURCE_OPS and n.op not in VIEW_OPS and n.id not in constant)


@dataclass
class PassReport:
    level: int
    passes: list[PassStat] = field(default_factory=list)
    ops_before: dict = field(default_factory=dict)
    ops_after: dict = field(default_factory=dict)
    kernels_before: int = 0
    kernels_after: int = 0
    bytes_before: int | None = None
    bytes_after: int | None = None
    #: a training graph's forward values read by its backward (``memory.activation_bytes``), default dims
    activations_after: int | None = None

    def stat(self, name: str) -> PassStat:
        return next(p for p in self.passes if p.name == name)

    def format(self) -> str:
        lines = [f"-O{self.level}: {len(self.passes)} pass(es)"]
        for p in self.passes:
            what = f"{p.matches} match(es)" if p.changed else "no change"
            lines.append(f"  {p.name:<20} {what:<16} nodes {p.nodes_before} -> {p.nodes_after}")
            lines.extend(f"      near miss: {m}" for m in p.near_misses)
            if p.ir_after is not None:
                lines.append(f"  IR after {p.name}:\n" + "\n".join("    " + ln for ln in p.ir_after.splitlines()))
        lines.append(f"  kernels {self.kernels_before} -> {self.kernels_after}")
        if self.bytes_before is not None:
            lines.append(f"  intermediate memory (planned peak, default dims) {self.bytes_before:,} -> "
                         f"{self.bytes_after:,} bytes")
        if self.activations_after is not None:
            lines.append(f"  activations the backward reads (default dims) {self.activations_after:,} bytes")
        fused = {op: c for op, c in self.ops_after.items() if c != self.ops_before.get(op, 0)}
        if fused:
            lines.append("  op counts changed: " + ", ".join(
                f"{op} {self.ops_before.get(op, 0)} -> {c}" for op, c in sorted(fused.items())))
        return "\n".join(lines)


def _peak(g: Graph, dims):
    try:
        return plan_memory(g, dims).peak_bytes
    except Exception:  # noqa: BLE001 - dims missing: the summary just omits memory
        return None


def _activations(g: Graph, dims):
    try:
        return activation_bytes(g, dims)
    except Exception:  # noqa: BLE001 - dims missing: the summary just omits memory
        return None


def _outputs(g: Graph, inputs, params):
    from .. import reference
    return reference.run(g, inputs, params, dtype="float64")


def _compare(name, before, after):
    for out, want in before.items():
        got = after[out]
        if not same_nonfinite(got, want):
            raise PassVerificationError(f"pass {name!r} changed output {out!r}: non-finite entries moved")
        finite = np.isfinite(want)
        err = float(np.max(np.abs(got[finite] - want[finite]), initial=0.0))
        scale = float(np.max(np.abs(want[finite]), initial=1.0))
        if err > 1e-9 * max(scale, 1.0):
            raise PassVerificationError(f"pass {name!r} changed output {out!r}: max abs difference {err:.3g} "
                                        f"(outputs up to {scale:.3g}); the passes before it kept the result")


def optimize(graph: Graph, level: int = 3, *, disable=(), print_after=None, verify_each=False,
             verify_dims=None, seed: int = 0, passes: list[str] | None = None, layout=None, checkpoint: bool = False):
    """Run the passes of ``level`` (or the list ``passes``) on a copy of ``graph``, then the target's layout
    passes ``layout`` ({name: pass}, in order: ``Target.layout_passes``), then, with ``checkpoint``, the
    recomputation of each layer's values in a training graph's backward (``checkpoint-layers``).

    Returns ``(optimized graph, PassReport)``.  ``print_after`` is a pass name or ``"all"``;
    ``verify_each`` checks the float64 interpreter's outputs after every pass."""
    if level not in LEVELS:
        raise ValueError(f"optimization level must be one of {sorted(LEVELS)}, got {level}")
    layout = dict(layout or {})
    known = {**PASSES, **layout}
    names = list(passes if passes is not None else LEVELS[level]) + list(layout)
    names += ["checkpoint-layers"] if checkpoint and "checkpoint-layers" not in names else []
    for option, given in (("passes", names), ("disable", list(disable)),
                          ("print_after", [print_after] if print_after not in (None, "all") else [])):
        unknown = [n for n in given if n not in known]
        if unknown:
            raise PassOptionError(option, f"unknown pass {', '.join(unknown)}; passes: {', '.join(known)} (a "
                                          f"target's layout passes run when a target is given)")
    if print_after not in (None, "all", *names) or print_after in disable:
        runs = [f"-O{lv}" for lv, lv_names in LEVELS.items() if print_after in lv_names]
        why = "it is disabled" if print_after in disable else \
            f"it runs at {', '.join(runs)}" if runs else "no level runs it"
        raise PassOptionError("print_after", f"pass {print_after} does not run in this pipeline (-O{level}: "
                                             f"{', '.join(names) or 'no passes'}), so there is no IR after it to "
                                             f"print; {why}")
    g = graph.copy()
    dims = verify_dims or g.meta.get("dims", {})
    report = PassReport(level, ops_before=g.op_counts(), kernels_before=kernel_count(g), bytes_before=_peak(g, dims))
    if verify_each:
        from ..inputs import random_inputs
        from ..weights import init_params
        meta = {g.node(i).name: g.node(i).meta for i in g.inputs}
        inputs = random_inputs(g.input_types(), dims, seed, meta)
        params = init_params(g, seed, perturb=True)
        reference_out = _outputs(g, inputs, params)
    for name in names:
        if name in disable:
            continue
        before = len(g)
        matches, misses = known[name](g)
        g.validate()
        stat = PassStat(name, before, len(g), matches, list(misses))
        if print_after in ("all", name):
            stat.ir_after = to_text(g)
        report.passes.append(stat)
        if verify_each:
            _compare(name, reference_out, _outputs(g, inputs, params))
    before = len(g)
    moved = schedule_training(g)  # a training graph's order: the backward's side values just before their use
    if moved:
        report.passes.append(PassStat("schedule-training", before, len(g), moved, []))
    report.ops_after, report.kernels_after, report.bytes_after = g.op_counts(), kernel_count(g), _peak(g, dims)
    report.activations_after = _activations(g, dims)
    return g, report
