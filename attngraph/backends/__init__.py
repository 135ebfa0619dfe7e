"""Backends: ``tvm`` (compiled kernels, its targets and its runtime), and the errors a backend raises.
The NumPy interpreter, the oracle every backend is checked against, is ``attngraph.reference``."""


import os


class BuildError(RuntimeError):
    """A graph that cannot be compiled for the target (names the node and why)."""


class ArtifactError(RuntimeError):
    """A missing, incomplete or corrupted artifact directory."""


class KernelCallError(RuntimeError):
    """A compiled kernel that failed when called (its runtime refused the arguments: a kernel plan naming
    a kernel of another signature); names the kernel and the node."""


class DeviceUnavailable(RuntimeError):
    """A compiled model that cannot run here: its device (GPU, driver, runtime library) is missing
    or lacks a feature or limit the kernels need."""


def is_artifact(path: str) -> bool:
    """Whether ``path`` looks like an artifact directory (rather than a model name)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json"))
