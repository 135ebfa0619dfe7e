"""A training step as one graph, and the callable that runs it.

``training_graph(graph, optimizer)`` differentiates ``graph``'s scalar loss (``passes.autodiff.grad``),
clips the gradients if asked, and adds the optimizer's update of every parameter.  The parameters
become inputs, and so do the optimizer's state (``adam.m:NAME``, ...) and its per-step scalars
(``adam.step_size``, ...); the outputs are the loss, the gradients' global norm (``grad_norm``) and the new
value of every parameter and slot, under the name of the input it replaces.  It is an ordinary graph: the passes optimize it, every target
compiles it, the interpreter runs it.

``TrainStep`` keeps that state where the step runs (device tensors for a compiled step: nothing goes
back to the host between steps but the loss) and computes the step's scalars on the host, and the step's
dropout seed where the graph has dropout (traced after ``model.train()``).  A step whose loss or gradient norm
is not finite is not taken: the state stays as it was before it and ``NonFiniteStep`` says so.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..ir import Graph, TensorType
from ..ir.ops import mix32
from ..ir.types import HALF_DTYPES
from ..nn.tensor import DROPOUT_SEED
from ..passes import optimize
from ..passes.autodiff import GRAD_PREFIX, AutodiffError, Builder, grad
from ..passes.precision import to_dtype
from ..passes.rewrite import remove_dead
from ..weights import check_params, load_weights, save_weights
from .optim import Optimizer

STEP_KEY = "step"


class NonFiniteStep(ArithmeticError):
    """A step's loss or gradients were not finite: its update was not applied (the state is as before it)."""

    def __init__(self, step: int, loss: float, grad_norm: float):
        self.step, self.loss, self.grad_norm = step, loss, grad_norm
        super().__init__(f"step {step}: the loss is {loss:.6g} and the gradients' norm {grad_norm:.6g}; "
                         f"the step's update was not applied")

GRAD_NORM = "grad_norm"  # the step's output: the gradients' global norm, before clipping


def _grad_norm(d: Builder, grads: dict[str, int]) -> int:
    """The global L2 norm of all gradients together (what ``torch.nn.utils.clip_grad_norm_`` returns)."""
    squares = []
    for gr in grads.values():
        sq = d("mul", gr, gr)
        rank = d.type(sq).rank
        squares.append(d("reduce_sum", sq, axes=tuple(range(rank))) if rank else sq)
    total = squares[0]
    for sq in squares[1:]:
        total = d("add", total, sq)
    return d("sqrt", total)


def _clip(d: Builder, grads: dict[str, int], norm: int, max_norm: float) -> dict[str, int]:
    """``torch.nn.utils.clip_grad_norm_``: every gradient times ``min(1, max_norm / (norm + 1e-6))``."""
    coef = d("div", d.const(max_norm, norm), d("add", norm, d.const(1e-6, norm)))
    coef = d("neg", d("maximum", d("neg", coef), d.const(-1.0, norm)))  # min(coef, 1)
    return {name: d("mul", gr, coef) for name, gr in grads.items()}


def training_graph(graph: Graph, optimizer: Optimizer, loss: str = "loss", level: int = 3) -> Graph:
    """The graph of one training step of ``graph`` (its output ``loss``, a float scalar) with ``optimizer``:
    inputs are the batch, the parameters, the optimizer's slots and step scalars; outputs the loss, the
    gradients' global norm and the new parameters and slots, named as the inputs they replace.  The forward is optimized at ``level``
    first: fused, an attention keeps no probabilities for the backward, whose derivative recomputes them."""
    names = list(graph.params)
    if not names:
        raise AutodiffError(f"{graph.name} has no parameters to train")
    dtypes = {graph.node(nid).type.dtype for nid in graph.params.values()}
    if len(dtypes) > 1:
        raise AutodiffError(f"{graph.name}'s parameters mix {', '.join(sorted(dtypes))}: a step updates one float type")
    clash = sorted(set(names) & set(graph.input_types()))
    if clash:
        raise AutodiffError(f"inputs of {graph.name} are named like parameters: {', '.join(clash)}")
    (dtype,) = dtypes
    if level:
        graph, _ = optimize(graph, level)
    g = grad(graph, loss, keep_outputs=False)
    outputs = dict(g.outputs)
    params = g.params
    d = Builder(g, {"scope": optimizer.name})
    scalars = {k: g.add("input", (), {"type": TensorType((), dtype)}, name=optimizer.scalar_name(k))
               for k in optimizer.scalars(1)}
    grads = {n: outputs[GRAD_PREFIX + n] for n in names}
    norm = _grad_norm(d, grads)
    if optimizer.clip_norm is not None:
        grads = _clip(d, grads, norm, optimizer.clip_norm)
    new = [(loss, outputs[loss]), (GRAD_NORM, norm)]
    for n in names:
        t = g.node(params[n]).type
        slots = {s: g.add("input", (), {"type": t}, name=optimizer.slot_name(s, n),
                          meta={"nonnegative": True} if s in optimizer.nonnegative else {}) for s in optimizer.slots}
        param, updated = optimizer.update(d, params[n], grads[n], slots, scalars)
        new.append((n, param))
        new += [(optimizer.slot_name(s, n), updated[s]) for s in optimizer.slots]
    for n in names:
        g.param_to_input(params[n])
    g.set_outputs(new)
    remove_dead(g)
    g.name = f"{graph.name}.train"
    g.validate()
    return g


class TrainStep:
    """``step(batch)`` runs one training step on ``batch`` (the model's inputs by name) and returns the loss.

    ``target``: "llvm", "vulkan", "cuda" (with ``device="emulator"``: on the CUDA source emulator) or
    "numpy" (the reference interpreter; ``dtype="float64"``: the float64 oracle of the compiled steps).
    ``dtype="bfloat16"`` (or float16): mixed precision, the forward and the backward in that type, the parameters,
    the gradients that update them and the optimizer's state in float32 (``passes.precision.to_dtype(master=True)``;
    the interpreter rounds as the build does, so ``target="numpy"`` is the same step's oracle).
    ``checkpoint``: recompute each layer's values in the backward from the layer's input (less memory,
    about one more forward of time; ``passes.checkpoint``).  The
    parameters and the optimizer's state stay where the step runs; ``params()`` reads them back,
    ``save``/``save_state`` write them (safetensors), ``load_state`` resumes."""

    def __init__(self, graph: Graph, params: Mapping[str, np.ndarray], optimizer: Optimizer, *, loss: str = "loss",
                 target: str = "llvm", opt_level: int = 3, device: str | None = None, dtype: str | None = None,
                 seed: int = 0, checkpoint: bool = False):
        from ..api import _checked, compile
        check_params(graph, params)
        self.optimizer, self.loss, self.target, self.seed = optimizer, loss, target, seed
        if dtype in HALF_DTYPES:  # mixed precision: the step's graph holds the casts; compiled as it is
            _checked(target, device=device, tuning_db=None, weight_dtype=None, dtype=dtype)  # the target builds it
            graph, dtype = to_dtype(graph, dtype, master=True), None
        self.graph = training_graph(graph, optimizer, loss, level=opt_level)
        self.names = list(graph.params)
        self.batch_inputs = set(graph.input_types()) - {DROPOUT_SEED}
        self.dropout = DROPOUT_SEED in graph.input_types()
        self.step, self.grad_norm = 0, None
        self.model = compile(self.graph, {}, target=target, opt_level=opt_level, device=device, checkpoint=checkpoint,
                             dtype=dtype)
        # the new state is written into the previous step's tensors: no planned buffers for it
        self.model.outputs_apart(self.names + [optimizer.slot_name(s, n) for n in self.names for s in optimizer.slots])
        state = {n: np.asarray(params[n]) for n in self.names}
        state.update({optimizer.slot_name(s, n): np.zeros_like(state[n]) for n in self.names for s in optimizer.slots})
        self._put(state)

    def _put(self, state: Mapping[str, np.ndarray]) -> None:
        types = self.graph.input_types()
        self.state = {k: self.model.put(v, types[k].dtype) for k, v in state.items()}
        self._spare: dict = {}

    def __call__(self, batch: Mapping[str, np.ndarray]) -> float:
        extra, missing = sorted(set(batch) - self.batch_inputs), sorted(self.batch_inputs - set(batch))
        if extra or missing:
            what = [f"has {', '.join(extra)}, which {self.graph.name} does not take"] if extra else []
            what += [f"lacks {', '.join(missing)}"] if missing else []
            raise KeyError(f"the batch {' and '.join(what)} (its inputs: {', '.join(sorted(self.batch_inputs))})")
        step = self.step + 1
        scalar_dtype = self.graph.input_types()[self.names[0]].dtype
        scalars = {self.optimizer.scalar_name(k): self.model.put(v, scalar_dtype)
                   for k, v in self.optimizer.scalars(step).items()}
        inputs = {**batch, **self.state, **scalars}
        if self.dropout:
            inputs[DROPOUT_SEED] = np.asarray(self.step_seed(step), np.int64)
        # the new state is written into the buffers of the state before this one
        out = self.model(inputs, keep=list(self.state), into=self._spare)
        loss, norm = float(out[self.loss]), float(out[GRAD_NORM])
        self.grad_norm = norm
        new = {k: out[k] for k in self.state}
        if not (np.isfinite(loss) and np.isfinite(norm)):  # the state before the step is intact
            self._spare = {k: v for k, v in new.items() if v is not self.state[k]}
            raise NonFiniteStep(step, loss, norm)
        self._spare = {k: v for k, v in self.state.items() if new[k] is not v}
        self.state = new
        self.step = step
        return loss

    def skip(self) -> None:
        """Count the step that ``NonFiniteStep`` refused as taken (its update left out), so the next step is
        the one after it."""
        self.step += 1

    def step_seed(self, step: int) -> int:
        """The dropout seed of ``step`` (from 1): a function of ``seed`` and the step alone, so a run resumed
        from saved state drops what the uninterrupted run would have."""
        def h(v: int) -> int:
            return int(mix32(np.array([v & 0xFFFFFFFF], np.uint32), np.uint32)[0])
        return h(self.seed ^ h(step)) & 0x7FFFFFFF

    def _host(self, names) -> dict[str, np.ndarray]:
        return {k: self.model.get(self.state[k]) for k in names}

    def params(self) -> dict[str, np.ndarray]:
        """The current parameters, on the host."""
        return self._host(self.names)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The optimizer's slots and the step count (``step``)."""
        out = self._host([k for k in self.state if k not in self.names])
        out[STEP_KEY] = np.asarray(self.step, np.int64)
        return out

    def save(self, path: str) -> None:
        save_weights(path, self.params())

    def save_state(self, path: str) -> None:
        save_weights(path, self.optimizer_state())

    def load_state(self, params: Mapping[str, np.ndarray], state: Mapping[str, np.ndarray] | str) -> None:
        """Resume from saved parameters and optimizer state (a mapping or a file ``save_state`` wrote)."""
        state = dict(load_weights(state) if isinstance(state, str) else state)
        step = int(state.pop(STEP_KEY, 0))
        want = {k for k in self.state if k not in self.names}
        if set(state) != want:
            missing, extra = sorted(want - set(state)), sorted(set(state) - want)
            raise KeyError(f"optimizer state does not fit this step: missing {missing}, unexpected {extra}")
        self._put({**{n: params[n] for n in self.names}, **state})
        self.step = step


__all__ = ["GRAD_NORM", "NonFiniteStep", "TrainStep", "training_graph"]
