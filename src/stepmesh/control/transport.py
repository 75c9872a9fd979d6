"""A thin layer over the ucxx low-level API: context and worker, endpoints, progress.

No asyncio: completion is observed by progressing the worker from the calling
thread (``polling``: busy-poll; ``blocking``: sleep in the worker's epoll fd
until UCX has work) or by a UCX progress thread (``thread``).

ucxx is imported on first use, never when ``stepmesh`` is imported.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..config import MEMORY_HINTS
from ..errors import PeerError, StepMeshError

__all__ = ["Transport", "ControlChannel", "EventLoop", "Waker", "bound_core", "ucp_library_path", "ucx_version", "wrap"]

_api: Any = None
_Array: Any = None
_THREAD_WAIT_S = 50e-6
_CORE_SPINS = 256  # busy-poll steps inside the core between its caller's liveness checks
_BLOCKING_SLICE_MS = 100


def _ucx() -> tuple[Any, Any]:
    """Import ucxx lazily (it writes UCX_* defaults into the environment on import)."""
    global _api, _Array
    if _api is None:
        try:
            import ucxx._lib.libucxx as api
            from ucxx._lib.arr import Array
        except ImportError as e:  # pragma: no cover - depends on the install
            raise StepMeshError(
                "ucxx is not installed: pip install 'stepmesh[cu12]' (or [cu13]) "
                f"to get the UCX wheels ({e})"
            ) from e
        _api, _Array = api, Array
    return _api, _Array


def ucp_library_path() -> str:
    """Where the libucp that ucxx loaded lives (the wheel's, or a system UCX's).

    Raises:
        StepMeshError: ucxx is not installed, or libucp is not loaded.
    """
    _ucx()
    path = _mapped("libucp.so")
    if path is None:
        raise StepMeshError("libucp is not loaded although ucxx is: cannot find it in /proc/self/maps")
    return path


def _mapped(prefix: str) -> str | None:
    """The path of a shared library of this process whose file name starts with ``prefix``."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith(prefix):
                    return path
    except OSError:
        pass
    return None


_core_bound: Any = None


def bound_core() -> Any:
    """The compiled core, bound to the libucp ucxx loaded (once per process).

    Raises:
        ImportError: the compiled core is missing (see :mod:`stepmesh._core`).
        StepMeshError: ucxx is not installed.
    """
    global _core_bound
    if _core_bound is None:
        from .._core import core

        core.bind_ucp(ucp_library_path())
        _core_bound = core
    return _core_bound


def ucx_version() -> str:
    api, _ = _ucx()
    return ".".join(map(str, api.get_ucx_version()))


def wrap(obj: Any) -> Any:
    """Wrap anything with the buffer protocol or ``__cuda_array_interface__`` for UCX."""
    _, Array = _ucx()
    return Array(obj)


class Transport:
    """One UCX context and worker, progressed in one of three modes; optionally a device lane beside it.

    Args:
        options: UCX options without the ``UCX_`` prefix (``{"TLS": "tcp"}``).
        progress: ``blocking``, ``polling`` or ``thread``.
        active_messages: enable UCX active messages (the control plane uses them).
        lane_options: options of a second context and worker, the *lane*, for
            small device messages (see :data:`stepmesh.data.wire.LANE_OPTIONS`);
            None: no lane. The lane is progressed with the worker, in the same mode.
        memory_hints: which buffers the compiled core tells UCX the memory type of
            (``off``, ``host``, ``all``: see ``STEPMESH_MEMORY_HINTS``); the rest UCX looks up.
        one_sided: enable UCX's one-sided calls on the worker (a server puts written answers with them).
    """

    def __init__(
        self, options: dict[str, str], progress: str, active_messages: bool = False,
        lane_options: dict[str, str] | None = None, memory_hints: str = "all", one_sided: bool = False,
    ):
        api, _ = _ucx()
        self.api = api
        features = [api.Feature.TAG, api.Feature.WAKEUP]
        if one_sided:
            features.append(api.Feature.RMA)
        if active_messages:
            features.append(api.Feature.AM)
        self.context = api.UCXContext(config_dict=dict(options), feature_flags=tuple(features))
        self.worker = api.UCXWorker(self.context)
        self.lane_context: Any = None
        self.lane_worker: Any = None
        self._epoll: Any = None  # blocking mode with a lane: sleeps on both workers' event fds
        workers = [self.worker]
        if lane_options is not None:
            self.lane_context = api.UCXContext(config_dict=dict(lane_options), feature_flags=(api.Feature.TAG, api.Feature.WAKEUP))
            self.lane_worker = api.UCXWorker(self.lane_context)
            workers.append(self.lane_worker)
        self.mode = progress
        self.memory_hints = memory_hints
        for worker in workers:
            if progress == "thread":
                worker.start_progress_thread(polling_mode=False, epoll_timeout=_BLOCKING_SLICE_MS)
            elif progress == "blocking":
                worker.init_blocking_progress_mode()
        if progress == "blocking" and self.lane_worker is not None:
            import select

            self._epoll = select.epoll()
            for worker in workers:
                self._epoll.register(worker.epoll_file_descriptor, select.EPOLLIN)
        self._closed = False
        self._ucp: Any = None
        self._closers: list[Callable[[], None]] = []

    @property
    def ucp(self) -> Any:
        """The compiled core's libucp calls on this worker and its lane (:class:`stepmesh._core.core.Ucp`)."""
        if self._ucp is None:
            core = bound_core()
            lane = self.lane_worker
            self._ucp = core.Ucp(self.worker, self.worker.handle, self.mode == "thread",
                                 lane, lane.handle if lane is not None else 0,
                                 MEMORY_HINTS.index(self.memory_hints), self.context, self.lane_context)
        return self._ucp

    @property
    def core_spins(self) -> int:
        """How many busy-poll steps a core call may take before returning to Python: none unless polling."""
        return _CORE_SPINS if self.mode == "polling" else 0

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when this transport closes, before its operations are cancelled (a core's own, say)."""
        self._closers.append(fn)

    @property
    def address(self) -> bytes:
        return bytes(self.worker.address)

    @property
    def has_lane(self) -> bool:
        return self.lane_worker is not None

    @property
    def lane_address(self) -> bytes:
        """The lane worker's address; empty without a lane."""
        return bytes(self.lane_worker.address) if self.lane_worker is not None else b""

    def transports(self) -> str:
        """What UCX says about this context (transports and devices), for ``stepmesh info``."""
        return str(self.context.info)

    def connect(self, address: bytes) -> Any:
        """An endpoint to a peer's worker address (UCX picks shm, CUDA-IPC, RDMA or TCP).

        Endpoint error handling stays off: with it on, shared-memory transports
        are unusable; liveness comes from the scheduler instead.
        """
        return self._endpoint(self.worker, address)

    def connect_lane(self, address: bytes) -> Any:
        """An endpoint from the lane to a peer's lane worker (as :meth:`connect`).

        Raises:
            StepMeshError: this transport has no lane.
        """
        if self.lane_worker is None:
            raise StepMeshError("connect_lane(): this transport has no lane")
        return self._endpoint(self.lane_worker, address)

    def _endpoint(self, worker: Any, address: bytes) -> Any:
        ucx_address = self.api.UCXAddress.create_from_buffer(address)
        return worker.create_endpoint_from_worker_address(ucx_address, False)

    def connect_listener(self, host: str, port: int) -> Any:
        """An endpoint to a listener (TCP), with UCX error handling on."""
        return self.api.UCXEndpoint.create(self.worker, host, port, True)

    def listen(self, port: int, on_endpoint: Callable[[Any], None]) -> Any:
        return self.api.UCXListener.create(self.worker, port, on_endpoint, deliver_endpoint=True)

    def tag(self, value: int) -> Any:
        return self.api.UCXXTag(value)

    def progress_once(self, timeout_ms: int = 0) -> None:
        """Make progress; in blocking mode sleep up to ``timeout_ms`` waiting for events."""
        if self.mode == "blocking":
            self._sleep(timeout_ms)
        elif self.mode == "polling":
            self.ucp.progress()  # the lane too
        else:
            time.sleep(_THREAD_WAIT_S if timeout_ms else 0)

    def progress_until(
        self,
        done: Callable[[], bool],
        deadline: float,
        check: Callable[[], None] | None = None,
        slice_ms: int = _BLOCKING_SLICE_MS,
    ) -> bool:
        """Progress until ``done()`` or the monotonic ``deadline``; False on timeout.

        ``check`` runs between progress steps and may raise (a dead peer, say).
        In blocking mode the worker sleeps at most ``slice_ms`` between checks,
        which bounds how late a ``done`` that no UCX event signals is noticed.
        """
        mode = self.mode
        if mode == "polling":
            # The latency-critical loop. ``done`` runs once UCX has no more to do
            # after moving something (a rendezvous takes several steps), and
            # every 4th idle spin for what no UCX progress signals (a CUDA
            # event); the deadline and ``check`` every 256 spins.
            progress = self.ucp.progress
            if done():
                return True
            while True:
                for i in range(256):
                    if progress():
                        while progress():
                            pass
                        if done():
                            return True
                    elif not i & 3 and done():
                        return True
                if check is not None:
                    check()
                if time.monotonic() >= deadline:
                    return done()
        while not done():
            if check is not None:
                check()
            now = time.monotonic()
            if now >= deadline:
                return done()
            if mode == "blocking":
                self._sleep(max(0, min(slice_ms, int((deadline - now) * 1000) + 1)))
            else:
                time.sleep(_THREAD_WAIT_S)
        return True

    def _sleep(self, timeout_ms: int) -> None:
        """Blocking mode: progress, then sleep up to ``timeout_ms`` until UCX has work (on either worker)."""
        if self._epoll is None:
            self.worker.progress_worker_event(timeout_ms)
            return
        progress = self.ucp.progress  # both workers
        if not progress() and self.worker.arm() and self.lane_worker.arm():
            self._epoll.poll(timeout_ms / 1000)
        while progress():
            pass

    def wait_requests(self, reqs: list[Any], deadline: float, check: Callable[[], None] | None = None) -> bool:
        """Progress until every one of ``reqs`` (core Requests) is complete; False on timeout.

        In polling mode the spinning runs inside the core: Python runs only
        ``check`` and the deadline, every 256 spins.
        """
        if self.mode != "polling":
            return self.progress_until(lambda: all([r.completed for r in reqs]), deadline, check)
        wait = self.ucp.wait
        while not wait(reqs, 256):
            if check is not None:
                check()
            if time.monotonic() >= deadline:
                return bool(wait(reqs, 0))
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fn in self._closers:
            fn()
        if self._ucp is not None:
            self._ucp.close()
        if self.mode == "thread":
            self.worker.stop_progress_thread()
            if self.lane_worker is not None:
                self.lane_worker.stop_progress_thread()
        if self._epoll is not None:
            self._epoll.close()


class ControlChannel:
    """Length-delimited messages over one UCX endpoint, using active messages.

    Keeps one receive posted and every send referenced until it completes.
    ``alive`` turns False when UCX reports the endpoint broken or closed.
    """

    def __init__(self, transport: Transport, endpoint: Any, on_close: Callable[[], None] | None = None):
        self.transport = transport
        self.endpoint = endpoint
        self.alive = True
        self._lock = threading.Lock()
        self._pending: list[tuple[Any, Any]] = []
        self._recv = endpoint.am_recv()
        self._on_close = on_close
        endpoint.set_close_callback(self._closed)

    def _closed(self, *args: Any) -> None:
        self.alive = False
        if self._on_close is not None:
            self._on_close()

    def send(self, data: bytes) -> None:
        """Queue ``data``; completes in the background as the worker progresses.

        Raises:
            PeerError: the endpoint is already known to be broken.
        """
        if not self.alive:
            raise PeerError("control connection is closed")
        arr = np.frombuffer(data, dtype=np.uint8)
        with self._lock:
            self._pending.append((self.endpoint.am_send(wrap(arr)), arr))

    def _reap(self) -> None:
        if self._pending:
            with self._lock:
                self._pending = [p for p in self._pending if not p[0].completed]

    @property
    def flushed(self) -> bool:
        self._reap()
        return not self._pending

    def poll(self) -> list[bytes]:
        """Messages received since the last call (empty if none)."""
        self._reap()
        out: list[bytes] = []
        # Messages that arrived before the endpoint closed are still delivered:
        # the scheduler's last word (a release, an error) often comes with the close.
        while self._recv is not None and self._recv.completed:
            req = self._recv
            try:
                req.check_error()
            except Exception:
                self.alive = False
                break
            buf = req.recv_buffer
            out.append(bytes(buf) if buf is not None else b"")
            try:
                self._recv = self.endpoint.am_recv()
            except Exception:  # the endpoint is gone: nothing more will arrive
                self._recv = None
                self.alive = False
        return out

    def close(self, hang_up: bool = False) -> None:
        """Stop receiving; with ``hang_up``, also close the endpoint, so that the peer sees it go at once.

        Sends still in flight stay referenced (and their buffers alive) until the
        endpoint itself goes away with this object.
        """
        self.alive = False
        try:
            self.endpoint.remove_close_callback()
        except Exception:
            pass
        self._recv = None
        if hang_up:  # never on a broken endpoint: ucxx crashes closing one
            try:
                if self.endpoint.alive:
                    self.endpoint.close()
            except Exception:
                pass


class Waker:
    """A self-pipe that wakes a thread sleeping in :meth:`Transport.sleep`."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def fileno(self) -> int:
        return self._r

    def wake(self) -> None:
        try:
            os.write(self._w, b"x")
        except (BlockingIOError, OSError):
            pass

    def drain(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass


class EventLoop:
    """Sleep on a blocking-mode worker's events or a :class:`Waker`, whichever comes first.

    The control plane of every process runs on one of these: no CPU is used while idle.
    """

    def __init__(self, transport: Transport, waker: Waker) -> None:
        import select

        if transport.mode != "blocking":
            raise ValueError("EventLoop needs a transport in blocking progress mode")
        self.transport = transport
        self.waker = waker
        self._epoll = select.epoll()
        self._epoll.register(transport.worker.epoll_file_descriptor, select.EPOLLIN)
        self._epoll.register(waker.fileno(), select.EPOLLIN)

    def run_once(self, timeout_s: float) -> None:
        """Progress; sleep only if that did nothing (what it did may need handling first)."""
        worker = self.transport.worker
        progressed = False
        while worker.progress_once():
            progressed = True
        if not progressed and worker.arm():
            self._epoll.poll(max(0.0, timeout_s))
            while worker.progress_once():
                pass
        self.waker.drain()

    def close(self) -> None:
        self._epoll.close()
