"""gpuserve's version, in a module of its own so that any layer can read it without importing
the package's public façade (and through it the rest of the package)."""

__version__ = "0.1.0"
