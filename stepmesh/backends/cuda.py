"""NVIDIA and AMD GPU memory through torch's device runtime (CUDA or HIP build).

UCX moves it with its copy engines (``cuda_copy``/``rocm_copy``), peer access
within a host (``cuda_ipc``/``rocm_ipc``) or the NIC (GPUDirect RDMA); nothing
here launches a kernel to move data.
"""

from __future__ import annotations

import ctypes
from typing import Any

from . import Backend


def _torch() -> Any:
    import torch

    return torch


class CUDABackend(Backend):
    name = "cuda"
    device_type = "cuda"
    ucx_transports = ("cuda_copy", "cuda_ipc", "gdr_copy", "rc", "dc")
    _hip = False

    def available(self) -> tuple[bool, str]:
        torch = _torch()
        if bool(getattr(torch.version, "hip", None)) != self._hip:
            return False, f"torch {torch.__version__} is not a {'ROCm' if self._hip else 'CUDA'} build"
        if not torch.cuda.is_available():
            return False, "no GPU visible to torch (torch.cuda.is_available() is False)"
        return True, ""

    def is_device(self) -> bool:
        return True

    def devices(self) -> list[str]:
        torch = _torch()
        if not self.available()[0]:
            return []
        return [f"{self.device_type}:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]

    _EVENTS_KEEP = 64  # idle events kept per device

    def __init__(self) -> None:
        self._idle: dict[int, list[Any]] = {}  # device index -> events free to record again
        self._query: Any = None  # (raw current stream of a device, cuStreamQuery), False for torch's, None: not looked up

    def _stream_query(self) -> Any:
        """The driver's ``cuStreamQuery`` and torch's raw current stream; False where either is missing (HIP)."""
        if self._query is None:
            self._query = False
            if not self._hip:
                try:
                    lib = ctypes.CDLL("libcuda.so.1")
                    query = lib.cuStreamQuery
                    query.argtypes = [ctypes.c_void_p]
                    query.restype = ctypes.c_int
                    self._query = (_torch()._C._cuda_getCurrentRawStream, query)
                except (OSError, AttributeError):
                    pass
        return self._query

    def record_event(self, device: Any = None) -> Any:
        """An event recorded on the current stream, or None when that stream has nothing left
        to run (what it produced is ready: there is nothing to wait for).

        Events come back through :meth:`release_event` (creating and destroying
        one per call cost more than recording a reused one).
        """
        torch = _torch()
        index = torch.cuda.current_device() if device is None or device.index is None else device.index
        query = self._query or self._stream_query()
        stream = None
        if query:
            raw, cu_stream_query = query
            if cu_stream_query(raw(index)) == 0:  # CUDA_SUCCESS: all work queued so far has completed
                return None
        else:
            stream = torch.cuda.current_stream(index)
            if stream.query():
                return None
        idle = self._idle.get(index)
        if idle:
            event = idle.pop()
        else:
            event = torch.cuda.Event()
            event.stepmesh_device = index
        event.record(stream if stream is not None else torch.cuda.current_stream(index))
        return event

    def release_event(self, event: Any) -> None:
        idle = self._idle.setdefault(event.stepmesh_device, [])
        if len(idle) < self._EVENTS_KEEP:
            idle.append(event)

    def wait_event(self, event: Any) -> None:
        if event is not None:
            event.synchronize()

    def set_device(self, index: int) -> None:
        _torch().cuda.set_device(index)


class ROCmBackend(CUDABackend):
    name = "rocm"
    ucx_transports = ("rocm_copy", "rocm_ipc", "rocm_gdr", "rc", "dc")
    _hip = True
