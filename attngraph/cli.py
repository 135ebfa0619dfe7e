"""The ``attngraph`` command line."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys

import click
import numpy as np

from . import models
from .backends import is_artifact
from .cli_common import artifact_options, check_target, parse_dims, reject_given, run_target_names, user_errors
from .inputs import dim_sizes, random_inputs
from .ir import to_dot, to_text
from .nn import trace
from .weights import default_params, load_weights


def input_meta(graph):
    return {graph.node(i).name: graph.node(i).meta for i in graph.inputs}


@click.group()
@click.version_option(package_name="attngraph")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="Threads of the compiled CPU kernels (default: every core; TVM_NUM_THREADS works too).")
def main(threads):
    """attngraph: Transformer models as graphs, optimized and compiled with TVM."""
    if threads is not None:
        from .threads import set_num_threads
        set_num_threads(threads)


@main.command("models")
def list_models():
    """List the models in the zoo: kind, parameters (at the default vocabulary) and where the weights come
    from (seeded random unless --weights, or a real checkpoint)."""
    rows = [("name", "kind", "params", "weights")]
    for name in models.names():
        d = models.describe(name)
        rows.append((name, d["kind"], models.count(d["params"]), d["weights"]))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        click.echo(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}")


def optimize_option(fn):
    """``-O`` and the pass-manager options shared by the commands that optimize."""
    options = [
        click.option("-O", "--opt-level", "opt_level", type=click.IntRange(0, 3), default=None,
                     help="Optimization level 0-3 (show: default 0, the graph as traced)."),
        click.option("--disable-pass", "disable", multiple=True, metavar="NAME", help="Skip a pass (to bisect)."),
        click.option("--verify-each", is_flag=True,
                     help="Run the float64 interpreter after every pass; name the first pass that changes the result."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def optimized(graph, opt_level, disable=(), verify_each=False, print_after=None, target=None, checkpoint=False):
    """``graph`` through the pass pipeline at ``opt_level`` (then ``target``'s layout passes, where one is
    given, and the checkpoint), and the report (None at -O0 with nothing asked)."""
    if not opt_level and not verify_each and not print_after and not disable and not target and not checkpoint:
        return graph, None
    from . import passes
    layout = None
    if target:
        from .backends.tvm.targets import get_target
        layout = get_target(target).layout_passes()
    with pass_options():
        return passes.optimize(graph, opt_level or 0, disable=tuple(disable), print_after=print_after,
                               verify_each=verify_each, layout=layout, checkpoint=checkpoint)


@contextlib.contextmanager
def pass_options():
    """A pass option the pass manager refuses, as an error of the CLI option that gave it."""
    from .passes import PassOptionError
    try:
        yield
    except PassOptionError as e:
        hint = {"disable": "--disable-pass", "print_after": "--print-after"}[e.option]
        raise click.BadParameter(str(e), param_hint=hint) from None


@main.command()
@click.argument("model")
@click.option("--format", "fmt", type=click.Choice(["text", "dot", "svg"]), default="text", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to a file instead of stdout.")
@optimize_option
@click.option("--stats", is_flag=True, help="Print what each pass matched, missed and why, and the kernel/memory summary.")
@click.option("--print-after", metavar="PASS|all", help="Print the IR after this pass (or after every pass).")
@click.option("--target", default=None, metavar="TARGET", callback=check_target,
              help="Also run this compile target's layout passes (llvm: pack-weights, read-merged-qkv), as a "
                   "build does.")
@click.option("--train", "training", is_flag=True,
              help="The graph of one training step instead: the model in training mode (dropout) with its token "
                   "loss (label smoothing 0.1, padding ignored), the backward and Adam's update under the paper's "
                   "schedule, as attngraph.train.TrainStep compiles it (the forward fused at -O first).")
@click.option("--checkpoint", is_flag=True,
              help="With --train: recompute each layer's values in the backward instead of keeping them "
                   "(attngraph train --checkpoint).")
@user_errors
def show(model, fmt, output, opt_level, disable, verify_each, stats, print_after, target, training, checkpoint):
    """Print MODEL's graph (a zoo name, path/to/file.py:factory or a saved torch.export program .pt2), optionally
    optimized."""
    if checkpoint and not training:
        raise click.BadParameter("checkpointing is of a training step: add --train", param_hint="--checkpoint")
    graph = models.load_graph(model) if not training else training_step_graph(model, opt_level or 0)
    graph, report = optimized(graph, opt_level, disable, verify_each, print_after, target, checkpoint)
    if report is not None and (stats or print_after):
        click.echo(report.format(), err=fmt != "text" and not output)
    if fmt == "text":
        text = to_text(graph)
    else:
        text = to_dot(graph)
        if fmt == "svg":
            dot = shutil.which("dot")
            if dot is None:
                raise click.ClickException("--format svg needs Graphviz's 'dot' program "
                                           "(Debian: apt-get install graphviz); --format dot works without it")
            text = subprocess.run([dot, "-Tsvg"], input=text, capture_output=True, text=True, check=True).stdout
    if output:
        with open(output, "w") as f:
            f.write(text + ("\n" if not text.endswith("\n") else ""))
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text)


def training_step_graph(model: str, opt_level: int):
    """MODEL's training step graph: ``TokenLoss`` in training mode, Adam under the paper's schedule."""
    from .train import Adam, Constant, Noam, TokenLoss, training_graph
    from .train.objective import NotATokenModel
    module = models.get(model)
    try:
        loss = TokenLoss(module).train()
    except NotATokenModel as e:
        raise click.BadParameter(str(e), param_hint="--train") from None
    d_model = getattr(module, "d_model", None)
    schedule = Noam(d_model) if isinstance(d_model, int) else Constant(1e-3)
    return training_graph(trace(loss), Adam(lr=schedule), level=opt_level)


def model_options(fn):
    """The options that say which weights and inputs a model runs on."""
    options = [
        click.option("--inputs", "inputs_path", type=click.Path(exists=True, dir_okay=False),
                     help=".npz with one array per model input; random inputs if omitted."),
        click.option("--weights", "weights_path", type=click.Path(dir_okay=False),
                     help=".safetensors or .npz weights; seeded random weights if omitted."),
        click.option("--seed", default=0, show_default=True, help="Seed for random weights and inputs."),
        click.option("--dim", "dims", multiple=True, metavar="NAME=INT", help="Size of a symbolic dim for random inputs."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def prepare(graph, inputs_path, weights_path, seed, dims, params=None, module=None, fits=None):
    """(params, inputs) for ``graph``: loaded from files, or the model's own (``params`` if given;
    ``module.default_params``: a real checkpoint), or seeded random.  ``fits(sizes, inputs_held)``, if
    given, checks that a run at those dims fits in memory before the random inputs are made (after a
    file's are loaded)."""
    if params is None:
        params = load_weights(weights_path) if weights_path else default_params(module or graph, seed)
        if weights_path:
            from .weights import check_finite
            check_finite(params, weights_path)
    elif weights_path:
        raise click.BadParameter("an artifact carries its weights; rebuild it to change them", param_hint="--weights")
    if inputs_path and dims:
        raise click.BadParameter("--dim sizes random inputs; with --inputs the arrays' shapes give the dims",
                                 param_hint="--dim")
    if inputs_path:
        with np.load(inputs_path, allow_pickle=False) as z:
            inputs = {k: z[k] for k in z.files}
        if fits is not None:
            from .inputs import bind_dims
            fits(bind_dims(graph.input_types(), inputs), True)
    else:
        sizes = dim_sizes(graph.input_types(), graph.meta.get("dims", {}), parse_dims(dims))
        if fits is not None:
            fits(sizes, False)
        inputs = random_inputs(graph.input_types(), sizes, seed, input_meta(graph))
    return params, inputs


def run_fits(graph, *, compiled=None, planned=False, dtype="float32"):
    """The ``fits`` check of ``prepare`` for a run of ``graph``: compiled (its memory plan), about to be
    compiled (``planned``: the planner on the graph) or interpreted in ``dtype``."""
    from .memory_check import check_run

    def fits(sizes, inputs_held):
        check_run(graph, sizes, compiled=compiled, planned=planned, inputs_held=inputs_held,
                  float_bytes=None if compiled is not None or planned else (8 if dtype == "float64" else 4),
                  hint="give smaller inputs" if inputs_held else "give smaller sizes with --dim NAME=INT")
    return fits


@main.command()
@click.argument("model")
@click.option("--target", default="numpy", show_default=True, callback=check_target, metavar="TARGET",
              help=f"numpy: the reference interpreter; {', '.join(run_target_names()[1:])}: compiled with TVM "
                   f"('attngraph targets' says what each is and which run here).")
@click.option("--device", default=None, metavar="NAME",
              help="Run the compiled model on another device than its target's own (emulator: a cuda build on "
                   "the CUDA source emulator, without a GPU).")
@click.option("--output", "output_path", type=click.Path(dir_okay=False), help="Write the outputs to this .npz.")
@model_options
@click.option("--dtype", type=click.Choice(["float32", "float64", "float16", "bfloat16"]), default="float32",
              show_default=True,
              help="float32, float64: the interpreter's precision (numpy target). float16, bfloat16: the model "
                   "in that type (weights and activations; arithmetic in float32, each value rounded to the type), "
                   "interpreted or compiled.")
@optimize_option
@user_errors
def run(model, target, device, output_path, inputs_path, weights_path, seed, dims, dtype, opt_level, disable,
        verify_each):
    """Run MODEL (a model, or an artifact DIR from attngraph build) and print (or save) its outputs.

    An artifact contains native code that runs when it is loaded, as any shared library does: run only
    artifacts from a source you trust (as torch.load's documentation says of pickles). The sha256 hashes in its
    manifest detect damage (a truncated or flipped file, a mixed rewrite), not tampering: whoever can rewrite a
    file can rewrite the manifest."""
    if target != "numpy" and not is_artifact(model) and dtype == "float64":
        reject_given(["dtype"], "float64 is the interpreter's precision (--target numpy); compiled code runs float32, "
                                "float16 or bfloat16")
    elif target == "numpy" and not is_artifact(model):
        reject_given(["device"], "where a compiled model runs (with --target or an artifact), not the interpreter")
    if is_artifact(model):
        artifact_options(model, ["target", "opt_level", "disable", "verify_each", "dtype"])
        from .api import load
        compiled = load(model, device)
    else:
        from .api import compile
        params = None
        if weights_path:
            from .weights import check_finite
            params = load_weights(weights_path)
            check_finite(params, weights_path)
        with pass_options():
            compiled = compile(models.get(model), params, target=target, opt_level=opt_level or 0, seed=seed,
                               device=device, dtype=dtype, disable=disable, verify_each=verify_each)
    interpreted = compiled.target == "numpy"
    _, inputs = prepare(compiled.graph, inputs_path, None, seed, dims, compiled.params,
                        fits=run_fits(compiled.graph, compiled=None if interpreted else compiled,
                                      dtype=getattr(compiled, "precision", "float32")))
    outputs = compiled(inputs)
    for name, value in outputs.items():
        finite = value[np.isfinite(value)] if value.dtype.kind == "f" else value
        stats = f"mean {finite.mean():.6g}, min {finite.min():.6g}, max {finite.max():.6g}" if finite.size else "no finite values"
        click.echo(f"{name}: {value.dtype}{list(value.shape)}  {stats}")
    if output_path:
        np.savez(output_path, **outputs)
        click.echo(f"wrote {output_path}", err=True)


from .commands_tvm import COMMANDS  # noqa: E402  (build, verify, tune)

for _command in COMMANDS:
    main.add_command(_command)

from .commands_generate import generate as _generate  # noqa: E402  (imports cli lazily: no cycle)

main.add_command(_generate)

from .commands_embed import embed as _embed  # noqa: E402

main.add_command(_embed)

from .commands_train import evaluate as _evaluate  # noqa: E402
from .commands_train import train as _train  # noqa: E402

main.add_command(_train)
main.add_command(_evaluate)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
