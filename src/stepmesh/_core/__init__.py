"""The compiled steady state of the data path (``core.pyx``); this package only loads it.

There is no slower fallback: without the compiled module, importing the data
plane fails here, saying how to get it.
"""

from __future__ import annotations

try:
    from stepmesh._core import core
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "stepmesh's compiled core (stepmesh._core.core) is missing or cannot load "
        f"({e}). Install a wheel (pip install stepmesh), or build it from a checkout, "
        "which needs a C compiler and the Python headers (pip install -e .)."
    ) from e

__all__ = ["core"]
