"""StepMesh on UCX: Attention-FFN disaggregation communication in Python.

``import stepmesh as f`` is a drop-in for StepMesh's ``import fserver_lib as f``:
one node per process, configured from the environment (``DMLC_*``, ``STEPMESH_*``)
unless a :class:`Config` is passed to :func:`init`.
"""

from __future__ import annotations

import time

from ._version import __version__
from .config import Config
from .errors import (
    AuthError,
    ConfigError,
    PeerError,
    ProtocolError,
    StepMeshError,
    TimeoutError,
)
from .scheduler import Scheduler
from .server import AFTensorServer
from .worker import AFTensorWorker

__all__ = [
    "__version__",
    "AFTensorServer",
    "AFTensorWorker",
    "AuthError",
    "Config",
    "ConfigError",
    "PeerError",
    "ProtocolError",
    "Scheduler",
    "StepMeshError",
    "TimeoutError",
    "barrier",
    "get_nanosecond",
    "init",
    "stop",
]

_node: Scheduler | AFTensorWorker | AFTensorServer | None = None


def init(config: Config | None = None) -> None:
    """Join the mesh as the role in ``config`` (default: ``DMLC_ROLE``).

    Workers and servers return once every node of their group is connected;
    the scheduler returns once it is serving.

    Raises:
        ConfigError: missing or invalid configuration, or the scheduler refused us.
        TimeoutError: the mesh was not complete within ``STEPMESH_INIT_TIMEOUT_MS``.
        PeerError: the scheduler or a peer went away during bring-up.
    """
    global _node
    if _node is not None:
        raise StepMeshError("stepmesh.init() was already called in this process; call stop() first")
    cfg = config if config is not None else Config.from_env()
    if cfg.role is None:
        raise ConfigError("DMLC_ROLE (role) is not set: expected one of scheduler, server, worker")
    node: Scheduler | AFTensorWorker | AFTensorServer
    if cfg.role == "scheduler":
        node = Scheduler(cfg)
        node.start()
    elif cfg.role == "server":
        node = AFTensorServer(cfg)
        node.start()
    else:
        node = AFTensorWorker(cfg)
        node.start()
    _node = node


def stop() -> None:
    """Global barrier of all nodes including the scheduler, then tear down. Idempotent.

    Raises:
        TimeoutError: the other nodes did not stop in time.
    """
    global _node
    node, _node = _node, None
    if node is not None:
        node.stop()


def barrier(include_server: bool = True, include_worker: bool = True) -> None:
    """Wait for every server and/or worker of this node's group.

    Raises:
        StepMeshError: not initialised, or called on the scheduler.
        TimeoutError: ``STEPMESH_BARRIER_TIMEOUT_MS`` passed first.
        PeerError: a participant died.
    """
    _member("barrier").barrier(include_server, include_worker)


def get_nanosecond() -> int:
    """The monotonic nanosecond clock used by traces."""
    return time.monotonic_ns()


def _member(call: str) -> AFTensorWorker | AFTensorServer:
    if _node is None:
        raise StepMeshError(f"stepmesh.{call}() before stepmesh.init()")
    if isinstance(_node, Scheduler):
        raise StepMeshError(f"stepmesh.{call}() is not available on the scheduler")
    return _node
