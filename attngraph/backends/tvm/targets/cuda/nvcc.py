"""nvcc here, where no GPU is: every cuda build's source is compiled to PTX as a check, so a build for a
GPU is known to compile before it ships."""

from __future__ import annotations

import os
import re
import shutil

from .... import BuildError


def kernel_names(source: str) -> list[str]:
    """The ``__global__`` kernel names in CUDA source, in order (each once: TVM declares every kernel
    before defining it)."""
    names = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(', source)
    return list(dict.fromkeys(names))


def find_nvcc() -> str | None:
    """Path of nvcc (PATH, then ``$CUDA_HOME/bin``), or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    path = os.path.join(home, "bin", "nvcc") if home else None
    return path if path and os.access(path, os.X_OK) else None


def check_cuda_source(source: str, arch: str, target_format: str = "ptx") -> bytes:
    """Compile CUDA ``source`` with nvcc for ``arch`` (``ptx`` or ``cubin``); returns the result.
    Proves that a CUDA build compiles without a GPU; raises ``BuildError`` with nvcc's message."""
    from tvm.support import nvcc
    if find_nvcc() is None:
        raise BuildError("cannot check CUDA source: nvcc not found (PATH or $CUDA_HOME/bin)")
    # compile_cuda reads the architecture from the current target even when given arch=.
    import tvm
    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        try:
            return nvcc.compile_cuda(source, target_format=target_format, arch=arch, compiler="nvcc")
        except Exception as e:  # nvcc's diagnostics are in the message
            raise BuildError(f"nvcc could not compile the generated CUDA source for {arch}: {e}") from e


def nvcc_check_enabled() -> bool:
    """Whether a cuda build compiles its source with nvcc (when nvcc is here; ATTNGRAPH_NVCC_CHECK=0 skips)."""
    return os.environ.get("ATTNGRAPH_NVCC_CHECK", "1") != "0" and find_nvcc() is not None
