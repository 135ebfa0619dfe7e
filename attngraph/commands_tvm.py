"""The compile commands of the ``attngraph`` CLI: ``build``, ``verify`` and ``tune``.

Registered on the main group by ``cli.py`` (``for c in COMMANDS: main.add_command(c)``); this module
does not import ``cli.py``, so either can be imported first.
"""

from __future__ import annotations

import os
import time

import click
import numpy as np

from .backends import is_artifact
from .cli_common import artifact_options, parse_dims, quantize_option, user_errors


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def _target_help() -> str:
    from .backends.tvm.targets import FAMILIES
    return ("Compile target: " + "; ".join(f"{name} ({what})" for name, (_, what) in FAMILIES.items())
            + ". 'attngraph targets' says which run here.")


target_option = click.option("--target", default="llvm", show_default=True, metavar="TARGET", help=_target_help())
device_option = click.option("--device", default=None, metavar="NAME",
                             help="Run on another device than the target's own: 'emulator' runs a cuda build on the "
                                  "CUDA source emulator, on this CPU, without a GPU (slow; 'attngraph targets' lists "
                                  "each target's devices).")
arch_option = click.option("--arch", default=None, metavar="SM",
                            help="CUDA architecture for --target cuda (sm_80 by default; sm_86, sm_89, sm_90, ...).")


def target_name(target: str, arch: str | None) -> str:
    """The target name for ``--target`` and ``--arch`` (``cuda`` with ``--arch sm_90``: ``cuda:sm_90``)."""
    if arch is None:
        return target
    if target.partition(":")[0] != "cuda":
        raise click.BadParameter(f"--arch is for --target cuda, not {target!r}", param_hint="--arch")
    if ":" in target and target != f"cuda:{arch}":
        raise click.BadParameter(f"--target {target} and --arch {arch} disagree", param_hint="--arch")
    return f"cuda:{arch}"
level_option = click.option("-O", "--opt-level", "opt_level", type=click.IntRange(0, 3), default=3, show_default=True,
                            help="Optimization level of the graph passes.")
weights_option = click.option("--weights", "weights_path", type=click.Path(exists=True, dir_okay=False),
                              help=".safetensors or .npz weights; seeded random weights if omitted.")
weight_dtype_option = click.option(
    "--weight-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
    help="Store the projection weights in this dtype (llvm; float16 halves what a decode step reads, computed "
         "in float32; verify then checks the kernels against the same rounded weights).")
seed_option = click.option("--seed", default=0, show_default=True, help="Seed for random weights and inputs.")
dtype_option = click.option(
    "--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32", show_default=True,
    help="The model's weights and activations in this type, its arithmetic in float32 (products accumulated, "
         "softmax and norm statistics in float32, as PyTorch's autocast); verify rounds the interpreter's values "
         "the same way. vulkan: float16 only, where the device has shader-f16.")


def device_source(out_dir: str, manifest: dict) -> str:
    """The generated device source of the artifact in ``out_dir``: CUDA C, or every kernel's WGSL."""
    from .backends.tvm.targets import get_target
    return get_target(manifest["target"]).device_source(out_dir, manifest)


@click.command()
@click.argument("model")
@target_option
@arch_option
@level_option
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False),
              help="The artifact directory to write.")
@weights_option
@seed_option
@click.option("--tuning-db", type=click.Path(file_okay=False), default=None,
              help="Use the schedules recorded by 'attngraph tune' in this database (default: none).")
@click.option("--dump-source", "dump_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the generated device source (CUDA C for cuda, WGSL for vulkan) to this file.")
@weight_dtype_option
@dtype_option
@quantize_option
@user_errors
def build(model, target, arch, opt_level, out_dir, weights_path, seed, tuning_db, dump_path, weight_dtype, dtype,
          quantize):
    """Optimize and compile MODEL into an artifact directory: manifest.json, the kernel library
    (kernels.so; kernels.wgsl.json for vulkan), weights.safetensors, graph.json.  Run it with
    'attngraph run DIR', check it with 'attngraph verify DIR'.  A rebuild of an unchanged DIR (the same model,
    weights, options, attngraph, TVM and CPU; its files whole) does nothing; other kernels already compiled come
    from the compile cache ($ATTNGRAPH_CACHE).  A GPU target compiles without its GPU; running needs it.

    One build writes DIR at a time (another fails at once), each file replaced whole, the manifest last; a
    directory holding other files is refused.

    An artifact contains native code that runs when it is loaded, as any shared library does: whoever loads it must
    trust its source (as torch.load's documentation says of pickles). The sha256 hashes in its
    manifest detect damage (a truncated or flipped file, a mixed rewrite), not tampering: whoever can rewrite a
    file can rewrite the manifest."""
    from . import api
    from .backends.tvm.progress import Progress
    from .weights import load_weights
    target = target_name(target, arch)
    from .backends.tvm.targets import get_target
    tgt = get_target(target)
    if dump_path and tgt.device_code is None:
        raise click.BadParameter(f"--dump-source is for the targets that generate device source (cuda, vulkan), "
                                 f"not {target!r}", param_hint="--dump-source")
    params = load_weights(weights_path) if weights_path else None
    with Progress() as progress:
        manifest = api.build(model, params, out_dir, target, opt_level, seed=seed, progress=progress,
                             tuning_db=tuning_db, weight_dtype=weight_dtype, dtype=dtype, quantize=quantize)
    b = manifest["build"]
    if b["up_to_date"]:
        click.echo(f"{out_dir} is up to date: {manifest['model']} for {target} at -O{opt_level}, built from the same "
                   f"graph, weights, options, code and CPU (checked in {b['seconds']:.1f} s): "
                   f"{len(manifest['kernel_plan'])} kernel calls, {len(manifest['kernels'])} distinct kernels")
    else:
        how = "from the compile cache" if b["cached"] else \
            f"lowering {b.get('lower', 0):.1f} s, compile {b.get('compile', 0):.1f} s, link {b.get('link', 0):.1f} s"
        click.echo(f"built {manifest['model']} for {target} at -O{opt_level} in {b['seconds']:.1f} s ({how}): "
                   f"{len(manifest['kernel_plan'])} kernel calls, {len(manifest['kernels'])} distinct kernels -> "
                   f"{out_dir}")
    plan = manifest.get("memory_plan")
    if plan:
        dims = ", ".join(f"{k}={v}" for k, v in plan["dims"].items())
        click.echo(f"memory at {dims}: peak {_mib(plan['peak_bytes'])} of intermediates in "
                   f"{len(plan['buffer_bytes'])} buffers (without reuse {_mib(plan['naive_bytes'])})")
    info = manifest.get("target_info") or {}
    if info:
        click.echo(f"{target}: " + ", ".join(f"{k} {v}" for k, v in info.items() if k != "code"))
    if dump_path:
        with open(dump_path, "w") as f:
            f.write(device_source(out_dir, manifest))
        click.echo(f"wrote the generated device source to {dump_path}")
    if target != "llvm":  # built for a GPU or another CPU: may not run here
        from .backends.tvm.targets import target_status
        problem = target_status(target)["run"]
        if problem:
            click.echo(f"note: compiled only; it cannot run here: {problem}")


@click.command()
@click.argument("model")
@target_option
@arch_option
@level_option
@click.option("--inputs", "inputs_path", type=click.Path(exists=True, dir_okay=False),
              help=".npz with one array per model input; seeded random inputs if omitted.")
@weights_option
@seed_option
@click.option("--dim", "dims", multiple=True, metavar="NAME=INT", help="Size of a symbolic dim for random inputs.")
@click.option("--per-node", is_flag=True,
              help="Compare every kernel's result with the interpreter's value of the same node; name the first "
                   "that diverges.")
@weight_dtype_option
@dtype_option
@quantize_option
@device_option
@user_errors
def verify(model, target, arch, opt_level, inputs_path, weights_path, seed, dims, per_node, weight_dtype, dtype, quantize,
           device):
    """Compile MODEL (or a DIR attngraph train wrote; or load an artifact DIR) and compare its outputs with the
    float64 interpreter on the same inputs and weights: max abs and rel error per output, PASS/FAIL at float32
    rtol 1e-4, atol 1e-5; float16 1e-2, 1e-2 and bfloat16 4e-2, 4e-2, the interpreter rounding each value to
    that type as the build stores it (-inf/NaN entries must be in the same places).

    An artifact contains native code that runs when it is loaded, as any shared library does: verify only
    artifacts from a source you trust (as torch.load's documentation says of pickles). The sha256 hashes in its
    manifest detect damage (a truncated or flipped file, a mixed rewrite), not tampering: whoever can rewrite a
    file can rewrite the manifest."""
    from . import api
    from .backends.tvm.progress import Progress
    from .weights import load_weights
    if weights_path and is_artifact(model):
        raise click.BadParameter("an artifact carries its weights; rebuild it to change them", param_hint="--weights")
    if is_artifact(model):
        artifact_options(model, ["target", "arch", "opt_level", "weight_dtype", "dtype", "quantize"])
    target = target_name(target, arch)
    params = load_weights(weights_path) if weights_path else None
    from .train.trainer import is_training_dir
    if is_training_dir(model):  # a model attngraph train wrote: its weights
        from .commands_generate import trained_model
        model, params, _ = trained_model(model, weights_path)
    inputs = None
    if inputs_path:
        with np.load(inputs_path, allow_pickle=False) as z:
            inputs = {k: z[k] for k in z.files}
    with Progress() as progress:
        report = api.verify(model, target=target, opt_level=opt_level, params=params, inputs=inputs,
                            dims=parse_dims(dims), seed=seed, per_node=per_node, progress=progress,
                            weight_dtype=weight_dtype, device=device, dtype=dtype, quantize=quantize)
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
    from .inputs import dim_sizes
    sizes = dim_sizes(graph.input_types(), graph.meta.get("dims", {}), parse_dims(dims))
    tuning_db = tuning_db or default_db(graph.name, target)
    start = time.perf_counter()
    results = tune_graph(g, sizes, tuning_db, target=target, trials=trials, ops=only,
                         log=lambda line: click.echo(line, err=True))
    for r in results:
        click.echo(str(r))
    click.echo(f"tuned {len(results)} kernels in {time.perf_counter() - start:.0f} s -> {tuning_db}; "
               f"build with: attngraph build {model} --tuning-db {tuning_db} -o DIR")


@click.command("tune-tiles")
@click.option("--rounds", default=7, show_default=True, help="Interleaved rounds per kernel (the best is kept).")
@click.option("--reset", is_flag=True, help="Forget this CPU's measured tiles (builds take the table's again).")
@user_errors
def tune_tiles(rounds, reset):
    """Measure the CPU kernels' register tiles on this CPU (about a minute) and keep the fastest for its llvm
    builds: the projections at many rows, a few rows and one row, the attention and the weight gradient, each over
    a few candidates.  'attngraph targets' says when a build uses them; ATTNGRAPH_TILES=table ignores them."""
    from .backends.tvm.targets.cpu import tile_tuning
    path = tile_tuning.record_path()
    if path is None:
        raise click.ClickException("caching is off (ATTNGRAPH_CACHE): the tiles would have nowhere to be kept")
    if reset:
        if os.path.exists(path):
            os.remove(path)
        click.echo(f"forgot the tiles measured on this CPU ({path}); builds take the table's")
        return
    if rounds < 1:
        raise click.BadParameter(f"must be at least 1, got {rounds}", param_hint="--rounds")
    start = time.perf_counter()
    click.echo("GFLOP/s of each candidate (rows x columns), the fastest marked *:")
    record = tile_tuning.tune(rounds, say=click.echo)
    chosen = ", ".join(f"{k} {v[0]} x {v[1]}" for k, v in record["tiles"].items())
    click.echo(f"measured in {time.perf_counter() - start:.0f} s on {record['cpu']} ({record['isa']} kernels): "
               f"{chosen} -> {path}; the next llvm builds use them")


@click.command("targets")
def targets():
    """List the compile targets: whether each compiles and runs here, and why not."""
    from .backends.tvm.targets import FAMILIES, get_target, target_status
    for name, (_, what) in FAMILIES.items():
        status = target_status(name)
        compiles = "yes" if status["compile"] is None else f"no ({status['compile']})"
        runs = "yes" if status["run"] is None else f"no ({status['run']})"
        click.echo(f"{name}: {what}\n  compile here: {compiles}\n  run here: {runs}")
        if status["note"]:
            click.echo(f"  {status['note']}")
        try:
            devices = get_target(name).devices
        except Exception:  # noqa: BLE001 - the target's module fails to import: said above
            devices = {}
        for device, about in devices.items():
            click.echo(f"  --device {device}: {about}")


COMMANDS = (build, verify, tune, tune_tiles, targets)
