"""The TVM backend: lowering to tensor expressions, build, and an in-process executor (llvm)."""

from .build import BuildError, CompiledModel, compile_graph

__all__ = ["BuildError", "CompiledModel", "compile_graph"]
