"""Tag sends and receives straight into libucp, on the handles of a ucxx worker.

ucxx wraps every operation in a C++ request, a shared pointer and a Python
object with a callback; the data path needs none of that. Here an operation
is one ``ucp_tag_send_nbx`` / ``ucp_tag_recv_nbx`` call through ctypes with a
parameter block built once, and completion is polled with
``ucp_request_check_status``: no callback, no allocation besides the small
:class:`Request` record.

The worker is ucxx's (thread mode MULTI, so a ucxx progress thread may run
beside these calls); context, endpoints, wake-up and progress stay ucxx's.

:func:`tag_ops` returns the C implementation of these classes (``_ucpc``,
built with the package when a compiler is there) and falls back to the ctypes
one here, which behaves the same a microsecond slower per call.
"""

from __future__ import annotations

import builtins
import ctypes
import os
import struct
from functools import partial
from time import monotonic_ns as _monotonic_ns
from typing import Any

import numpy as np

from .errors import StepMeshError

__all__ = [
    "FULL_MASK", "IoVec", "Request", "TagOps", "UcpError", "library_path", "native_available", "native_cores_available",
    "native_module", "tag_ops",
]

_INPROGRESS = 1
_ERR_MIN = (1 << 64) - 256  # pointers at or above this are UCS_PTR_STATUS(errors)
_ERR_CANCELED = -16
FULL_MASK = (1 << 64) - 1
_PARAM_SIZE = 72  # sizeof(ucp_request_param_t) on LP64 (UCX 1.21; older ones read less of it)
_FIELD_DATATYPE = 1 << 3  # UCP_OP_ATTR_FIELD_DATATYPE: param.op_attr_mask (offset 0) says param.datatype is set
_DATATYPE_AT = 24  # offsetof(ucp_request_param_t, datatype)
_DATATYPE_IOV = 2  # UCP_DATATYPE_IOV: the buffer is a ucp_dt_iov_t array, the count its length

_lib: Any = None
_check: Any = None
_free: Any = None
_native: Any = None  # the bound _ucpc module; False when it cannot be imported
_torch_bound = False


class UcpError(StepMeshError):
    """A UCX operation on the data path failed (its ``ucs_status_t`` is in the text)."""


def _load() -> Any:
    """libucp as ucxx loaded it (the wheel's, or the system's with RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY)."""
    global _lib, _check, _free
    if _lib is not None:
        return _lib
    lib = None
    try:
        lib = ctypes.CDLL("libucp.so.0", mode=os.RTLD_NOLOAD)
    except OSError:
        path = _mapped("libucp.so")
        if path is not None:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)
    if lib is None:
        raise StepMeshError("libucp is not loaded: import ucxx (stepmesh.transport does) before using the data path")
    vp, u64, sz = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t
    for name, args, res in (
        ("ucp_tag_send_nbx", [vp, vp, sz, u64, vp], vp),
        ("ucp_tag_recv_nbx", [vp, vp, sz, u64, u64, vp], vp),
        ("ucp_request_check_status", [vp], ctypes.c_int),
        ("ucp_request_cancel", [vp, vp], None),
        ("ucp_request_free", [vp], None),
        ("ucs_status_string", [ctypes.c_int], ctypes.c_char_p),
        ("ucp_worker_progress", [vp], ctypes.c_uint),
    ):
        try:
            fn = getattr(lib, name)
        except AttributeError as e:  # a system UCX older than 1.10 (RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY)
            raise StepMeshError(f"the loaded libucp has no {name}: stepmesh needs UCX 1.10 or newer ({e})") from e
        fn.argtypes = args
        fn.restype = res
    _lib, _check, _free = lib, lib.ucp_request_check_status, lib.ucp_request_free
    return lib


def library_path() -> str:
    """Where the libucp these calls go to lives (the wheel's, or a system UCX's).

    Raises:
        StepMeshError: libucp is not loaded.
    """
    _load()
    return _mapped("libucp.so") or str(_lib._name)


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


def _refused(status: int) -> None:
    raise UcpError(f"UCX refused a tag operation: {_status_text(status)}")


def failure(status: int) -> UcpError:
    """The error of a tag operation that completed with ``status``."""
    return UcpError(f"UCX tag operation failed: {_status_text(status)}")


def _failed(status: int) -> None:
    raise failure(status)


def _bound_native() -> Any:
    """The C implementation bound to the loaded libucp, or None when it was not built."""
    global _native
    if _native is None:
        try:
            from . import _ucpc
        except ImportError:
            _native = False
        else:
            lib = _load()
            names = ("ucp_tag_send_nbx", "ucp_tag_recv_nbx", "ucp_request_check_status", "ucp_request_free",
                     "ucp_request_cancel", "ucp_worker_progress")
            _ucpc.bind(tuple(ctypes.cast(getattr(lib, n), ctypes.c_void_p).value for n in names), _refused, _failed)
            _check_layout(_ucpc)
            _native = _ucpc
    return _native or None


def _check_layout(mod: Any) -> None:
    """The wire constants the C cores were built with must be stepmesh.protocol's.

    Raises:
        StepMeshError: they differ (a stale build: reinstall stepmesh).
    """
    from . import protocol as P

    if not _has_cores(mod):  # built from an older source: its tag operations still serve
        return
    built = (mod.SEQ_OFFSET, mod.SEQ_SHIFT, mod.RESP_FIXED)
    if built != (P.SEQ_OFFSET, P.SEQ_SHIFT, P.RESP_FIXED.size):
        raise StepMeshError(
            f"stepmesh._ucpc was built for another wire layout ({built}): reinstall stepmesh (pip install -e .)"
        )


def _has_cores(mod: Any) -> bool:
    return hasattr(mod, "WorkerCore") and hasattr(mod, "ServerCore")


def native_cores_available() -> bool:
    """Whether the C extension loads with its worker and server cores (not an older build without them).

    Raises:
        StepMeshError: ucxx (and with it libucp) cannot be loaded.
    """
    return native_available() and _has_cores(_native)


def native_module(ops: Any) -> Any:
    """The C module when ``ops`` are its tag operations and it has the worker and server cores, else None.

    Its cores compare tensors against torch's types: they are bound here, once.
    """
    global _torch_bound
    mod = _native or None
    if mod is None or type(ops) is not mod.TagOps or not _has_cores(mod):
        return None
    if not _torch_bound:
        import torch

        from ._tensors import DTYPE_CODE

        mod.bind_torch(torch.Tensor, DTYPE_CODE)
        _torch_bound = True
    return mod


def native_available() -> bool:
    """Whether the C implementation of the tag operations was built and loads.

    Raises:
        StepMeshError: ucxx (and with it libucp) cannot be loaded.
    """
    from .transport import _ucx

    _ucx()
    return _bound_native() is not None


def tag_ops(worker: Any, native: bool = True, threaded: bool = False) -> Any:
    """Tag operations on a ucxx worker: the C implementation when built and ``native``, else :class:`TagOps`.

    Args:
        worker: a ``ucxx._lib.libucxx.UCXWorker`` (it must outlive the result).
        native: use the C implementation when it is available.
        threaded: another thread (ucxx's progress thread) progresses the worker;
            the C calls then release the GIL around UCX, as ctypes does.
    """
    mod = _bound_native() if native else None
    if mod is None:
        return TagOps(worker)
    return mod.TagOps(worker, worker.handle, threaded)


def _status_text(status: int) -> str:
    text = _load().ucs_status_string(status)
    return f"{text.decode() if text else 'unknown status'} ({status})"


class Request:
    """One tag operation in flight; ``completed`` turns True once, and then the UCX request is freed."""

    __slots__ = ("_h", "_live", "status", "t_done")

    def __init__(self, handle: int, live: dict[int, Request]) -> None:
        self._h = handle
        self._live = live
        self.status = 0
        self.t_done = 0  # time.monotonic_ns() when seen complete; 0 when it completed within its call

    @property
    def completed(self) -> bool:
        h = self._h
        if not h:
            return True
        status = _check(h)
        if status == _INPROGRESS:
            return False
        self.status = status
        self.t_done = _monotonic_ns()
        self._h = 0
        del self._live[h]
        _free(h)
        return True

    def check_error(self) -> None:
        """Raise if the operation failed.

        Raises:
            UcpError: its UCX status (a truncated or cancelled receive, say).
        """
        if self.status:
            _failed(self.status)


class IoVec:
    """A ``ucp_dt_iov_t`` array: the pieces, in order, of one message (host memory only).

    Args:
        pieces: (address, bytes) of each piece.
    """

    __slots__ = ("array", "count", "ptr")

    def __init__(self, pieces: list[tuple[int, int]]) -> None:
        self.array = np.array([x for piece in pieces for x in piece], dtype=np.uint64)
        self.count = len(pieces)
        self.ptr = self.array.ctypes.data


class TagOps:
    """Tag sends and receives on one ucxx worker, posted and polled through libucp directly.

    Tags are plain ints; buffers are (address, bytes) of host or device memory
    (UCX detects which); the memory must stay valid until the request completes.

    Args:
        worker: a ``ucxx._lib.libucxx.UCXWorker`` (it must outlive this object).
    """

    def __init__(self, worker: Any) -> None:
        lib = _load()
        self._worker = worker
        self._wh = worker.handle
        self._send = lib.ucp_tag_send_nbx
        self._recv = lib.ucp_tag_recv_nbx
        self._cancel = lib.ucp_request_cancel
        self._param = ctypes.create_string_buffer(_PARAM_SIZE)  # zeros: no callback, contiguous bytes
        self._p = ctypes.addressof(self._param)
        self._iov_param = ctypes.create_string_buffer(_PARAM_SIZE)
        struct.pack_into("<I", self._iov_param, 0, _FIELD_DATATYPE)
        struct.pack_into("<Q", self._iov_param, _DATATYPE_AT, _DATATYPE_IOV)
        self._iov_p = ctypes.addressof(self._iov_param)
        self._live: dict[int, Request] = {}
        self._done = Request(0, self._live)  # what an operation that completed in the call returns
        # One progress step of the worker; non-zero when anything moved (a busy-poll's cheap idle spin).
        self.progress = partial(lib.ucp_worker_progress, self._wh)

    def _request(self, h: int | None) -> Request:
        if not h:
            return self._done
        if h >= _ERR_MIN:
            _refused(h - (1 << 64))
        r = self._live[h] = Request(h, self._live)
        return r

    def send(self, ep: int, ptr: int, nbytes: int, tag: int) -> Request:
        """Send ``nbytes`` at ``ptr`` on the endpoint whose ``ucp_ep_h`` is ``ep``.

        Raises:
            UcpError: UCX refused the send.
        """
        return self._request(self._send(ep, ptr, nbytes, tag, self._p))

    def recv(self, ptr: int, nbytes: int, tag: int, mask: int = FULL_MASK) -> Request:
        """Receive the next message whose tag matches ``tag`` under ``mask`` into ``ptr``.

        Raises:
            UcpError: UCX refused the receive.
        """
        return self._request(self._recv(self._wh, ptr, nbytes, tag, mask, self._p))

    def send_iov(self, ep: int, iov: IoVec, tag: int) -> Request:
        """Send the pieces of ``iov`` as one message (UCX gathers them: no copy here).

        Raises:
            UcpError: UCX refused the send.
        """
        return self._request(self._send(ep, iov.ptr, iov.count, tag, self._iov_p))

    def recv_iov(self, iov: IoVec, tag: int, mask: int = FULL_MASK) -> Request:
        """Receive the next matching message scattered over the pieces of ``iov``, in order.

        A shorter message fills the first pieces and leaves the rest as they were.

        Raises:
            UcpError: UCX refused the receive.
        """
        return self._request(self._recv(self._wh, iov.ptr, iov.count, tag, mask, self._iov_p))

    def wait(self, reqs: list[Request], spins: int, any: bool = False) -> bool:
        """Busy-poll the worker until all (with ``any``: one) of ``reqs`` are complete, for at most ``spins`` steps.

        Returns whether they are. Like :meth:`Transport.progress_until` in
        polling mode, it looks at the requests after UCX moved something, and
        every 4th idle step.
        """
        def settled() -> bool:
            if any:
                return not reqs or builtins.any([r.completed for r in reqs])
            return all([r.completed for r in reqs])  # each looked at: each gets its own t_done

        progress = self.progress
        for i in range(spins):
            moved = progress()
            if moved:
                while progress():
                    pass
            if (moved or not i & 3) and settled():
                return True
        return settled()

    def cancel(self, r: Request) -> None:
        """Cancel ``r`` if it is still in flight (it then completes with a cancelled status)."""
        if r._h:
            self._cancel(self._wh, r._h)

    @property
    def in_flight(self) -> int:
        return len(self._live)

    def close(self) -> None:
        """Cancel and release every operation still in flight (call before the worker goes)."""
        live, self._live = self._live, {}
        for h, r in live.items():
            self._cancel(self._wh, h)
            _free(h)
            r._h = 0
            r.status = _ERR_CANCELED
            r.t_done = _monotonic_ns()
