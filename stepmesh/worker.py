"""The attention side: push hidden states to every server, pull the answers back."""

from __future__ import annotations

from .node import Node

__all__ = ["AFTensorWorker"]


class AFTensorWorker(Node):
    """A worker (attention instance) of the mesh."""

    role = "worker"
