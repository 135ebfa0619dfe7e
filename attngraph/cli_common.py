"""What every ``attngraph`` command shares: user errors shown as one line, ``--dim`` parsing.

Kept free of TVM imports so that commands that do not compile start fast."""

from __future__ import annotations

import functools
import json
import os

import click
from click.core import ParameterSource

from .backends import ArtifactError, BuildError, DeviceUnavailable, KernelCallError
from .files import DirectoryBusy
from .inputs import InputError
from .ir import GraphError
from .ir.ops import IndexOutOfRange
from .models import ModelNotFound
from .nn import TraceError
from .passes import PassVerificationError
from .reference import InterpreterError
from .weights import WeightsError

#: Errors whose message is the whole story: shown without a traceback.
USER_ERRORS = (ModelNotFound, WeightsError, InputError, GraphError, TraceError, InterpreterError,
               PassVerificationError, BuildError, IndexOutOfRange, ArtifactError, DeviceUnavailable, DirectoryBusy,
               KernelCallError)


def user_errors(fn, extra: tuple = ()):
    """A command whose ``USER_ERRORS`` (and ``extra`` errors) show as one line without a traceback;
    so does a file the command cannot read or write (an ``OSError`` that names its file)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (*USER_ERRORS, *extra) as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            if e.filename is None:
                raise
            raise click.ClickException(f"{e.filename}: {e.strerror or e}") from None
    return wrapper


def run_target_names() -> list[str]:
    """What ``--target`` of ``run`` and ``generate`` accepts: ``numpy`` (the interpreter) and every compile
    target family (each also with its option: ``llvm:x86-64-v3``, ``cuda:sm_90``)."""
    from .backends.tvm.targets import FAMILIES
    return ["numpy", *FAMILIES]


def check_target(ctx, param, value):
    """A click callback: ``value`` names ``numpy`` or a compile target (``BuildError`` text otherwise)."""
    if value is None or value == "numpy":
        return value
    from .backends.tvm.targets import FAMILIES
    if value.partition(":")[0] not in FAMILIES:
        raise click.BadParameter(f"{value!r} is not one of {', '.join(run_target_names())} (with an option: "
                                 f"llvm:CPU, cuda:ARCH)")
    return value


def parse_dims(values) -> dict[str, int]:
    dims = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise click.BadParameter(f"expected NAME=INT, got {item!r}", param_hint="--dim")
        dims[name.strip()] = int(value)
    return dims


def given(name: str) -> bool:
    """Whether the user set the current command's option ``name`` (not left at its default)."""
    source = click.get_current_context().get_parameter_source(name)
    return source in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)


def reject_given(names, why: str, *, same_as: dict | None = None) -> None:
    """A usage error for the first option of ``names`` that the user set: it does not apply here
    (``why``).  ``same_as`` maps options to the value in force (an artifact's target): repeating that
    value is not an error."""
    ctx = click.get_current_context()
    for param in ctx.command.params:
        if param.name not in names or not given(param.name):
            continue
        value = ctx.params.get(param.name)
        if same_as and param.name in same_as and _same(value, same_as[param.name]):
            continue
        raise click.BadParameter(why, param_hint=max(param.opts, key=len))


def _same(value, in_force) -> bool:
    if isinstance(value, str) and isinstance(in_force, str):  # --target cuda:sm_90 against a cuda build
        return value == in_force or value.partition(":")[0] == in_force
    return value == in_force


def artifact_options(path: str, names, manifest_file: str = "manifest.json") -> None:
    """An artifact DIR is compiled already: options that say how to compile (``names``) do not apply
    to it, unless they repeat how it was built (``--target llvm`` for an llvm build)."""
    try:
        with open(os.path.join(path, manifest_file)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict):
        manifest = {}  # loading the artifact names what is wrong with it
    info = manifest.get("target_info")
    built = f"{manifest.get('target', '?')} at -O{manifest.get('opt_level', '?')}"
    reject_given(names, f"{path} is compiled already ({built}); this option applies when compiling a model, "
                        f"not to a built one: rebuild it with the option, or leave the option out",
                 same_as={"target": manifest.get("target"), "opt_level": manifest.get("opt_level"),
                          "weight_dtype": manifest.get("weight_dtype"), "cache_len": manifest.get("cache_len"),
                          "dtype": manifest.get("dtype", "float32"),
                          "quantize": None if manifest.get("quantize", "none") == "none" else manifest["quantize"],
                          "arch": info.get("arch") if isinstance(info, dict) else None})


#: ``--quantize`` of the commands that compile (build, verify, generate, embed)
quantize_option = click.option(
    "--quantize", type=click.Choice(["none", "int8"]), default="none", show_default=True,
    callback=lambda ctx, param, value: None if value == "none" else value,  # the API's None
    help="int8: the projections quantized (llvm): weights per output column, activations per row at each call, "
         "int32 sums (AVX512_VNNI's vpdpbusd where the CPU has it, else vpmaddwd); verify then judges each kernel "
         "alone and reports the error against the float32 build.")
