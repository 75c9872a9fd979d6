"""The ``stepmesh`` command line (installed as ``stepmesh.cli``)."""

from .main import main

__all__ = ["main"]
