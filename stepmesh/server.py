"""The FFN side: take a batch from every worker, answer into their buffers."""

from __future__ import annotations

from .node import Node

__all__ = ["AFTensorServer"]


class AFTensorServer(Node):
    """A server (FFN instance) of the mesh."""

    role = "server"
