"""Backends: ``reference`` (the NumPy interpreter, the oracle) and ``tvm`` (compiled kernels)."""


class BuildError(RuntimeError):
    """A graph that cannot be compiled for the target (names the node and why)."""
