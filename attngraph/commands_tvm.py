"""The compile commands of the ``attngraph`` CLI: ``build``, ``verify`` and ``tune``.

Registered on the main group by ``cli.py`` (``for c in COMMANDS: main.add_command(c)``); this module
does not import ``cli.py``, so either can be imported first.
"""

from __future__ import annotations

import time

import click
import numpy as np

from .backends import is_artifact
from .cli_common import parse_dims, user_errors


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


target_option = click.option("--target", default="llvm", show_default=True, metavar="TARGET",
                              help="Compile target (llvm: this CPU with its vector units).")
level_option = click.option("-O", "--opt-level", "opt_level", type=click.IntRange(0, 3), default=3, show_default=True,
                            help="Optimization level of the graph passes.")
weights_option = click.option("--weights", "weights_path", type=click.Path(exists=True, dir_okay=False),
                              help=".safetensors or .npz weights; seeded random weights if omitted.")
seed_option = click.option("--seed", default=0, show_default=True, help="Seed for random weights and inputs.")


@click.command()
@click.argument("model")
@target_option
@level_option
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="The artifact directory to write.")
@weights_option
@seed_option
@click.option("--tuning-db", type=click.Path(file_okay=False), default=None,
              help="Use the schedules recorded by 'attngraph tune' in this database (default: none).")
@user_errors
def build(model, target, opt_level, out_dir, weights_path, seed, tuning_db):
    """Optimize and compile MODEL into an artifact directory: manifest.json, kernels.so,
    weights.safetensors, graph.json.  Run it with 'attngraph run DIR', check it with
    'attngraph verify DIR'.  An unchanged rebuild comes from the compile cache ($ATTNGRAPH_CACHE)."""
    from . import api
    from .backends.tvm.progress import Progress
    from .weights import load_weights
    params = load_weights(weights_path) if weights_path else None
    with Progress() as progress:
        manifest = api.build(model, params, out_dir, target, opt_level, seed=seed, progress=progress,
                             tuning_db=tuning_db)
    b = manifest["build"]
    how = "from the compile cache" if b["cached"] else \
        f"lowering {b.get('lower', 0):.1f} s, LLVM {b.get('compile', 0):.1f} s, link {b.get('link', 0):.1f} s"
    click.echo(f"built {manifest['model']} for {target} at -O{opt_level} in {b['seconds']:.1f} s ({how}): "
               f"{len(manifest['kernel_plan'])} kernel calls, {len(manifest['kernels'])} distinct kernels -> {out_dir}")
    plan = manifest.get("memory_plan")
    if plan:
        dims = ", ".join(f"{k}={v}" for k, v in plan["dims"].items())
        click.echo(f"memory at {dims}: peak {_mib(plan['peak_bytes'])} of intermediates in "
                   f"{len(plan['buffer_bytes'])} buffers (without reuse {_mib(plan['naive_bytes'])})")


@click.command()
@click.argument("model")
@target_option
@level_option
@click.option("--inputs", "inputs_path", type=click.Path(exists=True, dir_okay=False),
              help=".npz with one array per model input; seeded random inputs if omitted.")
@weights_option
@seed_option
@click.option("--dim", "dims", multiple=True, metavar="NAME=INT", help="Size of a symbolic dim for random inputs.")
@click.option("--per-node", is_flag=True,
              help="Compare every kernel's result with the interpreter's value of the same node; name the first "
                   "that diverges.")
@user_errors
def verify(model, target, opt_level, inputs_path, weights_path, seed, dims, per_node):
    """Compile MODEL (or load an artifact DIR) and compare its outputs with the float64 interpreter
    on the same inputs and weights: max abs and rel error per output, PASS/FAIL at float32
    rtol 1e-4, atol 1e-5 (-inf/NaN entries must be in the same places)."""
    from . import api
    from .backends.tvm.progress import Progress
    from .weights import load_weights
    if weights_path and is_artifact(model):
        raise click.BadParameter("an artifact carries its weights; rebuild it to change them", param_hint="--weights")
    params = load_weights(weights_path) if weights_path else None
    inputs = None
    if inputs_path:
        with np.load(inputs_path, allow_pickle=False) as z:
            inputs = {k: z[k] for k in z.files}
    with Progress() as progress:
        report = api.verify(model, target=target, opt_level=opt_level, params=params, inputs=inputs,
                            dims=parse_dims(dims), seed=seed, per_node=per_node, progress=progress)
    click.echo(report.format())
    if not report.ok:
        raise SystemExit(1)


@click.command()
@click.argument("model")
@target_option
@level_option
@click.option("--trials", default=64, show_default=True, help="MetaSchedule trials per kernel.")
@click.option("--kernel", "only", multiple=True, metavar="OP",
              help="Tune only kernels of these ops (e.g. --kernel linear); default: every distinct kernel.")
@click.option("--dim", "dims", multiple=True, metavar="NAME=INT",
              help="Sizes the kernels are tuned at (default: the model's default dims).")
@click.option("--db", "tuning_db", type=click.Path(file_okay=False), default=None,
              help="Database directory (default: $ATTNGRAPH_CACHE/tuning/MODEL-TARGET).")
@user_errors
def tune(model, target, opt_level, trials, only, dims, tuning_db):
    """Auto-tune MODEL's kernels with TVM MetaSchedule (slow: minutes per kernel) and record the best
    schedules; 'attngraph build --tuning-db DB' then uses them wherever one beats the built-in
    schedule.  Optional: builds are fast without it."""
    from . import models
    from .backends.tvm.tune import default_db, tune_graph
    from .passes import optimize
    graph = models.load_graph(model)
    g, _ = optimize(graph, opt_level) if opt_level else (graph, None)
    sizes = {**graph.meta.get("dims", {}), **parse_dims(dims)}
    tuning_db = tuning_db or default_db(graph.name, target)
    start = time.perf_counter()
    results = tune_graph(g, sizes, tuning_db, target=target, trials=trials, ops=only,
                         log=lambda line: click.echo(line, err=True))
    for r in results:
        click.echo(str(r))
    click.echo(f"tuned {len(results)} kernels in {time.perf_counter() - start:.0f} s -> {tuning_db}; "
               f"build with: attngraph build {model} --tuning-db {tuning_db} -o DIR")


COMMANDS = (build, verify, tune)
