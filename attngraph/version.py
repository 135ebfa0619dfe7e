"""attngraph's version (one place: the package, the artifacts' manifests and the CLI read it)."""

__version__ = "0.1.0"
