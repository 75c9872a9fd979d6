"""StepMesh on UCX: Attention-FFN disaggregation communication in Python.

``import stepmesh as f`` is a drop-in for StepMesh's ``import fserver_lib as f``:
one node per process, configured from the environment (``DMLC_*``, ``STEPMESH_*``)
unless a :class:`Config` is passed to :func:`init`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .config import Config
from .control.node import NodeInfo
from .control.scheduler import Scheduler
from .errors import (
    ArgumentError,
    AuthError,
    ConfigError,
    PeerError,
    ProtocolError,
    StepMeshError,
    TimeoutError,
    TransportError,
)
from .kernels import map_pinned_tensor, seq_add_one, wait_flag, write_flag
from .notify import SimpleNotify

if TYPE_CHECKING:
    from .data.server import AFTensorServer
    from .data.worker import AFTensorWorker


def __getattr__(name: str) -> Any:
    """The worker and server classes import torch: only when first used (the scheduler never does)."""
    if name == "AFTensorWorker":
        from .data.worker import AFTensorWorker

        return AFTensorWorker
    if name == "AFTensorServer":
        from .data.server import AFTensorServer

        return AFTensorServer
    raise AttributeError(f"module 'stepmesh' has no attribute {name!r}")

__all__ = [
    "__version__",
    "AFTensorServer",
    "AFTensorWorker",
    "ArgumentError",
    "AuthError",
    "Config",
    "ConfigError",
    "NodeInfo",
    "PeerError",
    "ProtocolError",
    "Scheduler",
    "SimpleNotify",
    "StepMeshError",
    "TimeoutError",
    "TransportError",
    "barrier",
    "fetch_trace",
    "flush",
    "get_all_handlers",
    "get_batch",
    "get_nanosecond",
    "init",
    "map_pinned_tensor",
    "node_info",
    "push_pull",
    "register_recv_buffer",
    "respond",
    "respond_vec",
    "seq_add_one",
    "stop",
    "wait",
    "wait_flag",
    "workers_stopped",
    "write_flag",
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
    if cfg.verbose:
        _verbose_logging(cfg.verbose)
    node: Scheduler | AFTensorWorker | AFTensorServer
    if cfg.role == "scheduler":
        node = Scheduler(cfg)
        node.start()
    elif cfg.role == "server":
        from .data.server import AFTensorServer

        node = AFTensorServer(cfg)
        node.start()
    else:
        from .data.worker import AFTensorWorker

        node = AFTensorWorker(cfg)
        node.start()
    _node = node


def _verbose_logging(level: int) -> None:
    """PS_VERBOSE: 1 = INFO, 2 = DEBUG on the ``stepmesh`` loggers; stderr if nothing else is set up."""
    import logging

    logger = logging.getLogger("stepmesh")
    logger.setLevel(logging.DEBUG if level >= 2 else logging.INFO)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s"))
        logger.addHandler(handler)


def stop() -> None:
    """Global barrier of all nodes including the scheduler, then tear down. Idempotent.

    Raises:
        TimeoutError: the other nodes did not stop in time.
    """
    global _node
    node, _node = _node, None
    if node is not None:
        node.stop()


def barrier(
    include_server: bool = True, include_worker: bool = True, instance_barrier: bool = True,
    timeout_ms: int | None = None,
) -> None:
    """Wait for every server and/or worker: of every instance group (``instance_barrier``, StepMesh's default) or of this node's.

    Raises:
        ArgumentError: ``instance_barrier`` is not a bool.
        StepMeshError: not initialised, or called on the scheduler.
        TimeoutError: ``timeout_ms`` (default ``STEPMESH_BARRIER_TIMEOUT_MS``) passed first.
        PeerError: a participant died.
    """
    _member("barrier").barrier(include_server, include_worker, instance_barrier, timeout_ms)


def node_info() -> NodeInfo:
    """Who this process is: role, rank, group, and how many workers and servers it exchanges with.

    Raises:
        StepMeshError: before init() (or after stop()).
    """
    if _node is None:
        raise StepMeshError("stepmesh.node_info() before stepmesh.init()")
    if isinstance(_node, Scheduler):
        cfg = _node.config
        return NodeInfo("scheduler", 0, 0, cfg.group_size, cfg.num_workers, cfg.num_servers, 0)
    return _node.info


def get_nanosecond() -> int:
    """The monotonic nanosecond clock used by traces."""
    return time.monotonic_ns()


def _worker_class() -> type[AFTensorWorker]:
    from .data.worker import AFTensorWorker

    return AFTensorWorker


def _server_class() -> type[AFTensorServer]:
    from .data.server import AFTensorServer

    return AFTensorServer


def _member(call: str) -> AFTensorWorker | AFTensorServer:
    if _node is None:
        raise StepMeshError(f"stepmesh.{call}() before stepmesh.init()")
    if isinstance(_node, Scheduler):
        raise StepMeshError(f"stepmesh.{call}() is not available on the scheduler")
    return _node


def _worker(call: str) -> AFTensorWorker:
    node = _node
    if getattr(node, "role", None) == "worker":  # the hot path: one check
        return node  # type: ignore[return-value]
    member = _member(call)
    if not isinstance(member, _worker_class()):
        raise StepMeshError(f"stepmesh.{call}() is a worker call; this process is a {member.role}")
    return member


def _server(call: str) -> AFTensorServer:
    node = _node
    if getattr(node, "role", None) == "server":
        return node  # type: ignore[return-value]
    member = _member(call)
    if not isinstance(member, _server_class()):
        raise StepMeshError(f"stepmesh.{call}() is a server call; this process is a {member.role}")
    return member


def push_pull(
    push_tensors: list[Any],
    push_keys: list[int],
    pull_tensors: list[Any],
    pull_keys: list[int],
    need_event: bool = True,
) -> int:
    """StepMesh's ZBatchPushPull; see :meth:`AFTensorWorker.push_pull`."""
    node = _node
    if getattr(node, "role", None) != "worker":  # the hot path: one check, no call
        node = _worker("push_pull")
    return node.push_pull(push_tensors, push_keys, pull_tensors, pull_keys, need_event)  # type: ignore[union-attr]


def wait(handle: int | None = None, timeout_ms: int = 10000, *, handler: int | None = None) -> None:
    """Block until a push_pull completes; see :meth:`AFTensorWorker.wait`.

    ``handler=`` is StepMesh's keyword for ``handle``.

    Raises:
        ArgumentError: no handle given, or both spellings.
    """
    node = _node
    if getattr(node, "role", None) != "worker":
        node = _worker("wait")
    if handler is not None or handle is None:
        handle = _handle_arg(handle, handler)
    node.wait(handle, timeout_ms)  # type: ignore[union-attr]


def _handle_arg(handle: int | None, handler: int | None) -> int:
    if (handle is None) == (handler is None):
        raise ArgumentError("give the handle once: handle=... (or StepMesh's handler=...)")
    return handle if handle is not None else handler  # type: ignore[return-value]


def get_all_handlers(handle: int) -> list[int]:
    """The handle and its per-server sub-handles; see :meth:`AFTensorWorker.get_all_handlers`."""
    return _worker("get_all_handlers").get_all_handlers(handle)


def fetch_trace(handle: int, server: int | None = None) -> list[int]:
    """Eight nanosecond stamps of a push_pull; see :meth:`AFTensorWorker.fetch_trace`."""
    return _worker("fetch_trace").fetch_trace(handle, server)


def get_batch(timeout_ms: int | None = None) -> list[tuple[int, list[Any], list[int]]]:
    """One request per worker; see :meth:`AFTensorServer.get_batch`."""
    node = _node
    if getattr(node, "role", None) != "server":
        node = _server("get_batch")
    return node.get_batch(timeout_ms)  # type: ignore[union-attr]


def respond(
    tensors: list[Any], handle: int | None = None, need_event: bool = True, *, handler: int | None = None
) -> None:
    """Answer one request; see :meth:`AFTensorServer.respond` (``handler=`` is StepMesh's keyword).

    Raises:
        ArgumentError: no handle given, or both spellings.
    """
    node = _node
    if getattr(node, "role", None) != "server":
        node = _server("respond")
    if handler is not None or handle is None:
        handle = _handle_arg(handle, handler)
    node.respond(tensors, handle, need_event)  # type: ignore[union-attr]


def respond_vec(ret_buffer: Any, tensors_vec: list[Any], handles: list[int]) -> None:
    """Answer several requests from one buffer; see :meth:`AFTensorServer.respond_vec`."""
    _server("respond_vec").respond_vec(ret_buffer, tensors_vec, handles)


def workers_stopped() -> bool:
    """Whether every worker of this server's group has entered ``stop()`` (then ``get_batch()`` returns ``[]``).

    A server loop that ends with its workers::

        while True:
            batch = stepmesh.get_batch()
            if not batch and stepmesh.workers_stopped():
                break
            ...

    Raises:
        StepMeshError: not initialised, or not a server.
    """
    return _server("workers_stopped").workers_stopped


def flush(timeout_ms: int = 10000) -> None:
    """Wait until every answer sent so far is delivered; see :meth:`AFTensorServer.flush`."""
    _server("flush").flush(timeout_ms)


def register_recv_buffer(tensor: Any, worker_ranks: list[int], push_keys: list[int]) -> None:
    """Pre-register receive memory; see :meth:`AFTensorServer.register_recv_buffer`."""
    _server("register_recv_buffer").register_recv_buffer(tensor, worker_ranks, push_keys)
