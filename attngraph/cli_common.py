"""What every ``attngraph`` command shares: user errors shown as one line, ``--dim`` parsing.

Kept free of TVM imports so that commands that do not compile start fast."""

from __future__ import annotations

import functools

import click

from .backends import ArtifactError, BuildError, DeviceUnavailable
from .backends.reference import InterpreterError
from .inputs import InputError
from .ir import GraphError
from .ir.ops import IndexOutOfRange
from .models import ModelNotFound
from .nn import TraceError
from .passes import PassVerificationError
from .weights import WeightsError

#: Errors whose message is the whole story: shown without a traceback.
USER_ERRORS = (ModelNotFound, WeightsError, InputError, GraphError, TraceError, InterpreterError,
               PassVerificationError, BuildError, IndexOutOfRange, ArtifactError, DeviceUnavailable)


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from None
    return wrapper


def parse_dims(values) -> dict[str, int]:
    dims = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise click.BadParameter(f"expected NAME=INT, got {item!r}", param_hint="--dim")
        dims[name.strip()] = int(value)
    return dims
