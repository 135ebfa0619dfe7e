"""Backends: ``reference`` (the NumPy interpreter, the oracle); TVM backends arrive beside it."""
