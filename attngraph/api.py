"""The public compile API: ``build`` a model into an artifact, ``load`` it back, ``compile`` it in
memory, and ``verify`` compiled numerics against the float64 interpreter.

    manifest = attngraph.build("transformer-base", out_dir="art", target="llvm", opt_level=3)
    model = attngraph.load("art");  outputs = model({"src": src, "tgt": tgt})
    report = attngraph.verify("art", per_node=True);  print(report.format())
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .backends import BuildError
from .backends.tvm.artifact import (
    ArtifactError,
    is_artifact,
    load_artifact,
    manifest_of,
    artifact_dir,
    up_to_date,
    write_artifact,
)
from .ir import Graph
from .ir.types import HALF_DTYPES
from .numerics import OutputCheck, compare, verify_outputs

__all__ = ["ArtifactError", "BuildError", "NodeCheck", "VerifyReport", "build", "compile", "load", "verify"]


def _graph_of(model) -> tuple[Graph, object]:
    """(graph, the Module it was traced from or None) for a Graph, a zoo name / ``file.py:factory``,
    or a DSL Module."""
    from . import models
    from .nn import Module, trace
    if isinstance(model, Graph):
        return model, None
    if isinstance(model, str):
        model = models.get(model)
    if isinstance(model, Module):
        return trace(model), model
    raise TypeError(f"expected a Graph, a model name or an attngraph.nn.Module, got {type(model).__name__}")


def compile(model, params: Mapping[str, np.ndarray] | None = None, *, target: str = "llvm", opt_level: int = 3,
            seed: int = 0, progress=None, tuning_db: str | None = None, weight_dtype: str | None = None,
            device: str | None = None, checkpoint: bool = False, dtype: str | None = None, disable=(),
            verify_each: bool = False, quantize: str | None = None):
    """Optimize ``model`` at ``opt_level`` and compile it for ``target``, in memory: a callable
    ``CompiledModel`` (``model.kernels`` says how it was built); ``target="numpy"``: an ``InterpretedModel``,
    the graph run by the reference interpreter behind the same call (``dtype="float64"``: in float64).  ``params`` default to seeded random
    weights, or the model's own (``default_params()``: a zoo model's real checkpoint); ``tuning_db`` is
    a MetaSchedule database written by ``attngraph tune``; ``weight_dtype="float16"`` stores the
    projection weights in half precision (llvm); ``device``: run on another device than the target's
    own (``"emulator"``: a cuda build on the CUDA source emulator, here, without a GPU); ``checkpoint``: a
    training step recomputes each layer's values in its backward instead of keeping them (``passes.checkpoint``);
    ``dtype="float16"`` or ``"bfloat16"``: the model's weights and activations in that type, its arithmetic in
    float32 (``passes.precision``); ``disable``, ``verify_each``: see ``passes.optimize``; ``quantize="int8"``: the
    projections in int8 (llvm: weights per column, activations per row, int32 sums; ``targets/cpu/ops.py``)."""
    tgt, dtype, precision = _checked(target, device=device, tuning_db=tuning_db, weight_dtype=weight_dtype,
                                     dtype=dtype, quantize=quantize)
    return _compile(*_graph_of(model), params, tgt, opt_level=opt_level, seed=seed, progress=progress,
                    tuning_db=tuning_db, weight_dtype=weight_dtype, device=device, checkpoint=checkpoint, dtype=dtype,
                    precision=precision, disable=disable, verify_each=verify_each, quantize=quantize)


def _checked(target: str, *, device, tuning_db, weight_dtype, dtype, quantize=None):
    """(the Target or None for the interpreter, the model's dtype, the interpreter's precision or None), the
    options checked against the target before any work."""
    from .backends.interpreter import NUMPY
    from .backends.tvm.targets import get_target
    interpreted = target == NUMPY
    tgt = None if interpreted else get_target(target)  # an unknown target fails before any work
    if interpreted:
        given = [name for name, value in (("device", device), ("tuning_db", tuning_db)) if value] + \
            (["weight_dtype"] if weight_dtype not in (None, "float32") else []) + (["quantize"] if quantize else [])
        if given:
            raise BuildError(f"target numpy (the interpreter) compiles no kernels: {', '.join(given)} does not apply")
        if dtype == "float64":  # the interpreter's own precision: the oracle's
            dtype, precision = None, "float64"
        else:
            precision = "float32"
    else:
        tgt.check_device(device)
    if dtype not in (None, "float32", *HALF_DTYPES):
        also = ", float64 with target numpy" if not interpreted else ""
        raise BuildError(f"dtype {dtype!r}: a model builds in float32, {' or '.join(HALF_DTYPES)}{also}")
    if not interpreted and dtype not in (None, "float32") and dtype not in tgt.half_dtypes:
        raise BuildError(f"target {target} cannot build a model in {dtype}"
                         + (f": {tgt.half_dtypes_note}" if tgt.half_dtypes_note else "")
                         + f"; it builds {', '.join(('float32',) + tgt.half_dtypes)}")
    if quantize and dtype not in (None, "float32"):
        raise BuildError(f"quantize {quantize} quantizes a float32 model's projections, not a {dtype} one")
    if not interpreted:
        tgt.layout_passes(weight_dtype, quantize)  # the target refuses what it cannot build, before any work
    return tgt, dtype, precision if interpreted else None


def _compile(graph, module, params, tgt, *, opt_level, seed, progress, tuning_db, weight_dtype, device, checkpoint,
             dtype, precision, disable=(), verify_each=False, quantize=None):
    """``compile``'s work once its options are checked: ``tgt`` the Target, or None for the interpreter in
    ``precision``."""
    from .backends.interpreter import InterpretedModel
    from .backends.tvm.build import compile_graph
    from .passes import optimize
    from .passes.precision import params_in, to_dtype
    from .weights import check_finite, check_params, default_params
    interpreted = tgt is None
    #: where the weights came from when none were given: a checkpoint path, or None (seeded random)
    weights_from = getattr(module, "checkpoint", None) if params is None else None
    if params is not None:  # a user's weights: NaN or inf ones would compute nothing but NaN
        check_finite({k: v for k, v in params.items() if not k.startswith("__const__.")}, "the weights given")
    params = default_params(module if module is not None else graph, seed) if params is None else params
    check_params(graph, params)
    if dtype not in (None, "float32"):
        graph = to_dtype(graph, dtype)
        params = params_in(params, graph)
    # the level's passes, then the target's layout passes (reported, as every pass)
    g, report = optimize(graph, opt_level, layout={} if interpreted else tgt.layout_passes(weight_dtype, quantize),
                         checkpoint=checkpoint, disable=tuple(disable), verify_each=verify_each, seed=seed)
    used = g.params  # a property that walks the graph: once, not per parameter
    params = {k: v for k, v in params.items() if k in used}
    if interpreted:
        compiled = InterpretedModel(g, params, precision)
    else:
        compiled = compile_graph(g, params, tgt, progress=progress, tuning_db=tuning_db, device=device, layout=False)
    compiled.model_name, compiled.opt_level, compiled.weights_from = graph.name, opt_level, weights_from
    compiled.quantize = quantize
    compiled.report = report
    return compiled


def build(model, params: Mapping[str, np.ndarray] | None = None, out_dir: str | None = None, target: str = "llvm",
          opt_level: int = 3, *, seed: int = 0, progress=None, tuning_db: str | None = None,
          weight_dtype: str | None = None, dtype: str | None = None, quantize: str | None = None) -> dict:
    """Optimize and compile ``model`` and write the artifact directory ``out_dir`` (manifest,
    kernels.so, weights.safetensors, graph.json).  Returns the manifest, with the build's timings
    under ``"build"``."""
    if not out_dir:
        raise ValueError("build needs out_dir, the artifact directory to write")
    if target == "numpy":
        raise BuildError("target numpy is the interpreter: it compiles nothing to write; build for llvm, cuda or "
                         "vulkan, or use attngraph.compile(model, target='numpy')")
    from .backends.tvm.stamp import build_stamp, weights_identity
    from .backends.tvm.targets.cpu.tile_tuning import measured_tiles
    start = time.perf_counter()
    tgt, dtype, _ = _checked(target, device=None, tuning_db=tuning_db, weight_dtype=weight_dtype, dtype=dtype,
                             quantize=quantize)
    with artifact_dir(out_dir):  # held from before the compile: a second build into it fails at once
        graph, module = _graph_of(model)
        options = {"target": target, "opt_level": opt_level, "tuning_db": tuning_db,
                   "weight_dtype": weight_dtype or "float32", "dtype": dtype or "float32",
                   "quantize": quantize or "none",
                   "tiles": measured_tiles()}  # this CPU's register tiles, where measured (``tune-tiles``)
        stamp = build_stamp(graph, weights_identity(module, params, seed), options)
        manifest = up_to_date(out_dir, stamp)
        if manifest is not None:  # built from the same graph, weights, options, code and CPU: nothing to do
            manifest["build"] = {"seconds": round(time.perf_counter() - start, 3), "cached": True, "up_to_date": True}
            return manifest
        compiled = _compile(graph, module, params, tgt, opt_level=opt_level, seed=seed, progress=progress,
                            tuning_db=tuning_db, weight_dtype=weight_dtype, device=None, checkpoint=False, dtype=dtype,
                            precision=None, quantize=quantize)
        kernels = compiled.kernels
        manifest = manifest_of(compiled, kernels, model_name=compiled.model_name, opt_level=opt_level)
        manifest["dtype"] = dtype or "float32"
        manifest["quantize"] = quantize or "none"
        if stamp is not None:
            manifest["stamp"] = stamp
        manifest = write_artifact(out_dir, compiled, kernels, manifest, held=True)
    manifest["build"] = {"seconds": round(time.perf_counter() - start, 3), "cached": kernels.cached,
                         "up_to_date": False, **{k: round(v, 3) for k, v in kernels.seconds.items()}}
    return manifest


def load(path: str, device: str | None = None):
    """The compiled model in artifact directory ``path``: ``model(inputs) -> outputs`` with NumPy
    arrays by name; wrong input names, shapes or dtypes are an ``InputError``.  Works in a fresh
    process (it needs only TVM's runtime, NumPy and safetensors).  ``device``: another device than the
    target's own (``"emulator"``: a cuda artifact on the CUDA source emulator)."""
    return load_artifact(path, device)


@dataclass
class NodeCheck:
    """One kernel's result in the compiled run against the interpreter's value of the same node."""
    node: str
    op: str
    kernel: str
    check: OutputCheck
    alone: OutputCheck | None = None  # the kernel run on the interpreter's operands (first divergence only)


@dataclass
class VerifyReport:
    model: str
    target: str
    opt_level: int
    dims: dict
    outputs: list[OutputCheck]
    nodes: list[NodeCheck] = field(default_factory=list)
    build: str = ""
    #: a quantized build's kernels, each run alone on the interpreter's operands (what it is judged by), and its
    #: outputs against the float32 build's (the quantization's own error, reported)
    alone: list[NodeCheck] = field(default_factory=list)
    quantized: str | None = None
    against_float32: list[OutputCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        if self.quantized:  # a value on either side of a rounding step moves by a step: judged kernel by kernel
            return all(n.check.ok for n in self.alone)
        return all(c.ok for c in self.outputs)

    @property
    def first_divergence(self) -> NodeCheck | None:
        return next((n for n in self.nodes if not n.check.ok), None)

    def format(self) -> str:
        """The report as text: build line, one line per output, and the per-node verdict."""
        lines = [self.build] if self.build else []
        lines.append(f"compared with the float64 interpreter at {', '.join(f'{k}={v}' for k, v in self.dims.items())}")
        lines += [c.measured() if self.quantized else str(c) for c in self.outputs]
        if self.nodes:
            bad = self.first_divergence
            worst = max(self.nodes, key=lambda n: n.check.max_rel if np.isfinite(n.check.max_rel) else np.inf)
            lines.append(f"per node: {len(self.nodes)} kernel results compared; largest relative error "
                         f"{worst.check.max_rel:.3g} at %{worst.node} ({worst.op})")
            if bad is None:
                lines.append("per node: every kernel result is within tolerance")
            else:
                lines.append(f"per node: first divergence at %{bad.node} = {bad.op} (kernel {bad.kernel}): {bad.check}")
                if bad.alone is not None:
                    verdict = ("the kernel alone is within tolerance, so the error was carried in from earlier "
                               "nodes' rounding" if bad.alone.ok else "the kernel alone is wrong")
                    lines.append(f"  run alone on the interpreter's operands: max abs error {bad.alone.max_abs:.3g}, "
                                 f"max rel error {bad.alone.max_rel:.3g}: {verdict}")
        if self.quantized:
            lines.append(f"{self.quantized}: the outputs are reported, not judged (a value the interpreter's float64 and "
                         f"the build's float32 round to either side of a quantization step differs by a step, and "
                         f"carries it on); each kernel is judged alone, on the interpreter's operands")
            bad = next((n for n in self.alone if not n.check.ok), None)
            worst = max(self.alone, key=lambda n: n.check.max_rel if np.isfinite(n.check.max_rel) else np.inf,
                        default=None)
            if worst is not None:
                lines.append(f"kernels alone: {len(self.alone)} compared; largest relative error {worst.check.max_rel:.3g} "
                             f"at %{worst.node} ({worst.op})" + ("" if bad is None else f"; wrong: %{bad.node} = {bad.op} "
                                                                   f"(kernel {bad.kernel}): {bad.check}"))
            lines += [f"against the float32 build: {c.measured()}" for c in self.against_float32]
            lines.append("PASS" if self.ok else "FAIL: a kernel alone differs from the interpreter beyond the tolerance")
            return "\n".join(lines)
        lines.append("PASS" if self.ok else "FAIL: compiled outputs differ from the interpreter beyond the tolerance")
        return "\n".join(lines)


def verify(model, *, target: str = "llvm", opt_level: int = 3, params: Mapping[str, np.ndarray] | None = None,
           inputs: Mapping[str, np.ndarray] | None = None, dims: Mapping[str, int] | None = None, seed: int = 0,
           per_node: bool = False, progress=None, weight_dtype: str | None = None,
           device: str | None = None, dtype: str | None = None, quantize: str | None = None) -> VerifyReport:
    """Compile ``model`` (or load an artifact directory) and compare it with the float64 interpreter
    on the same inputs and weights (given, or seeded random at the model's default dims, overridden by
    ``dims``: each a dim of the model's inputs, else ``InputError``).

    Each output: max abs and rel error and pass/fail at the tolerance of its dtype
    (``attngraph.numerics.TOLERANCE``: float32 rtol 1e-4, atol 1e-5; float16 1e-2, 1e-2; bfloat16 4e-2, 4e-2:
    the interpreter rounds each op's result to a half-precision type as the build does); -inf/NaN must
    be in the same places.  ``dtype``: see ``compile``.  ``per_node``: every kernel's result against the
    interpreter's value of the same node; the first that diverges is also run alone on the interpreter's operands, to tell a wrong kernel
    from rounding carried in from earlier nodes.  ``device``: see ``compile`` and ``load``."""
    from .backends.interpreter import InterpretedModel
    from .inputs import InputError, bind_dims, dim_sizes, random_inputs
    start = time.perf_counter()
    if isinstance(model, str) and is_artifact(model):
        if params is not None:
            raise ValueError("an artifact carries its weights; rebuild it to change them")
        compiled = load_artifact(model, device)
        m = compiled.manifest
        name, target, opt_level = m["model"], m["target"], m["opt_level"]
        quantize = None if m.get("quantize", "none") == "none" else m["quantize"]
        how = f"loaded {model}: {name} for {target} at -O{opt_level}" + (f" on the {device}" if device else "")
    else:
        compiled = compile(model, params, target=target, opt_level=opt_level, seed=seed, progress=progress,
                           weight_dtype=weight_dtype, device=device, dtype=dtype, quantize=quantize)
        name = compiled.model_name
        k = compiled.kernels
        how = (f"built {name} for {target} at -O{opt_level}: {compiled.kernel_count} kernel calls, "
               f"{len(k.specs)} distinct kernels" + (" (from the compile cache)" if k.cached else "")
               + (f", weights of the checkpoint {compiled.weights_from}" if compiled.weights_from else ""))
    how += f", {time.perf_counter() - start:.1f} s"
    graph, params = compiled.graph, compiled.params
    if inputs is not None and dims:
        raise InputError("--dim (dims=) sizes random inputs; with --inputs (inputs=) the arrays' shapes give the dims")
    if inputs is None:
        sizes = dim_sizes(graph.input_types(), graph.meta.get("dims", {}), dims or {})
        meta = {graph.node(i).name: graph.node(i).meta for i in graph.inputs}
        inputs = random_inputs(graph.input_types(), sizes, seed, meta)
    bound = bind_dims(graph.input_types(), inputs)
    got_nodes, want_nodes = {}, {}
    observe_got = (lambda n, v: got_nodes.__setitem__(n.id, v)) if per_node else None
    observe_want = (lambda n, v: want_nodes.__setitem__(n.id, v)) if per_node or quantize else None
    got = compiled(inputs, observe=observe_got)
    want = InterpretedModel(graph, params, "float64")(inputs, observe=observe_want)
    report = VerifyReport(name, target, opt_level, bound, verify_outputs(got, want), build=how, quantized=quantize)
    if quantize:
        for step in compiled.steps:
            if step.kind == "kernel":
                n = graph.node(step.node)
                alone = compiled.run_kernel(step.node, [want_nodes[o] for o in graph.operands(step.node)], bound)
                report.alone.append(NodeCheck(n.name, n.op, step.kernel, compare(n.name, alone, want_nodes[step.node])))
        if not (isinstance(model, str) and is_artifact(model)):  # the same model unquantized: the quantization's error
            wide = compile(model, params, target=target, opt_level=opt_level, seed=seed, weight_dtype=weight_dtype,
                           device=device, dtype=dtype)(inputs)
            report.against_float32 = verify_outputs(got, {k: np.asarray(v, np.float64) for k, v in wide.items()})
    if per_node:
        for step in compiled.steps:
            if step.kind != "kernel":
                continue
            n = graph.node(step.node)
            check = compare(n.name, got_nodes[step.node], want_nodes[step.node])
            report.nodes.append(NodeCheck(n.name, n.op, step.kernel, check))
        bad = report.first_divergence
        if bad is not None:
            nid = next(s.node for s in compiled.steps if s.kind == "kernel" and graph.node(s.node).name == bad.node)
            operands = [want_nodes[o] for o in graph.operands(nid)]
            alone = compiled.run_kernel(nid, operands, bound)
            bad.alone = compare(bad.node, alone, want_nodes[nid])
    return report

