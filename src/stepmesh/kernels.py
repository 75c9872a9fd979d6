"""StepMesh's wait kernels (its PR #41): a GPU stream and a CPU thread hand a sequence number back and forth.

``map_pinned_tensor`` gives a device view of pinned host memory; ``write_flag``
is a one-thread kernel that stores a device-resident ``seq`` into such a flag
(visible to the CPU); ``wait_flag`` spins until ``flag >= seq``; ``seq_add_one``
increments ``seq``. Because ``seq`` lives on the device, a CUDA graph that
captures them waits for a new value at every replay.

The kernels are Triton's (which torch's CUDA builds ship): nothing is compiled
at install time. They are compiled on first use (``map_pinned_tensor`` does it,
so that a graph captured afterwards only records launches).
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

from .errors import ArgumentError, ConfigError, TransportError

__all__ = ["map_pinned_tensor", "write_flag", "wait_flag", "seq_add_one", "device_pointer"]

_lock = threading.Lock()
_kernels: Any = None
_driver: Any = None


def _torch() -> Any:
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("stepmesh's wait kernels need a CUDA device; torch sees none here")
    if getattr(torch.version, "hip", None):
        raise ConfigError(
            "stepmesh's wait kernels are written for CUDA (its PTX fence and the CUDA driver's stream waits); "
            "ROCm is not supported yet, nor is SimpleNotify: on ROCm wait with wait()/get_batch() on the host"
        )
    return torch


class _Driver:
    """The CUDA driver calls the wait path needs (ctypes: no build, no extra package)."""

    def __init__(self) -> None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise ConfigError(f"the CUDA driver (libcuda.so.1) cannot be loaded: {e}") from e
        self.device_pointer = getattr(lib, "cuMemHostGetDevicePointer_v2", None) or lib.cuMemHostGetDevicePointer
        self.device_pointer.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint]
        self.device_pointer.restype = ctypes.c_int
        self.wait_value = getattr(lib, "cuStreamWaitValue32_v2", None) or lib.cuStreamWaitValue32
        self.wait_value.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        self.wait_value.restype = ctypes.c_int

    @staticmethod
    def check(status: int, what: str) -> None:
        if status != 0:
            raise TransportError(f"{what} failed with CUDA driver error {status}")


def driver() -> _Driver:
    """The process's CUDA driver binding (made once).

    Raises:
        ConfigError: no CUDA driver here.
    """
    global _driver
    with _lock:
        if _driver is None:
            _driver = _Driver()
        return _driver  # type: ignore[no-any-return]


def device_pointer(host_ptr: int) -> int:
    """The device address of pinned (mapped) host memory at ``host_ptr``.

    Raises:
        ConfigError: no CUDA driver here.
        TransportError: the memory is not pinned by CUDA (the driver refused it).
    """
    d = driver()
    out = ctypes.c_uint64(0)
    d.check(d.device_pointer(ctypes.byref(out), ctypes.c_void_p(host_ptr), 0), "cuMemHostGetDevicePointer")
    return out.value


class _DeviceView:
    """``__cuda_array_interface__`` over pinned host memory's device address; keeps the host tensor alive."""

    def __init__(self, host: Any, dptr: int, typestr: str) -> None:
        self.host = host
        itemsize = host.element_size()
        self.__cuda_array_interface__ = {
            "shape": tuple(host.shape),
            "strides": tuple(s * itemsize for s in host.stride()),
            "typestr": typestr,
            "data": (dptr, False),
            "version": 3,
        }


_TYPESTR = {"int64": "<i8", "int32": "<i4", "int16": "<i2", "int8": "|i1", "uint8": "|u1", "float32": "<f4",
            "float64": "<f8", "float16": "<f2", "bool": "|b1"}


def map_pinned_tensor(tensor: Any, device_index: int) -> Any:
    """A CUDA tensor over the same (pinned) host memory as ``tensor``: kernels write it, the CPU reads it.

    Raises:
        ArgumentError: ``tensor`` is not a pinned host tensor of a plain dtype, or ``device_index`` is no GPU.
        ConfigError: no CUDA device, driver or Triton here.
    """
    torch = _torch()
    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu" or not tensor.is_pinned():
        raise ArgumentError("tensor must be a pinned host tensor (torch.zeros(..., pin_memory=True))")
    name = str(tensor.dtype).removeprefix("torch.")
    if name not in _TYPESTR:
        raise ArgumentError(f"tensor has dtype {tensor.dtype}; a flag is an integer or float tensor ({', '.join(_TYPESTR)})")
    if isinstance(device_index, bool) or not isinstance(device_index, int) or not 0 <= device_index < torch.cuda.device_count():
        raise ArgumentError(f"device_index must be a GPU index 0..{torch.cuda.device_count() - 1}, got {device_index!r}")
    with torch.cuda.device(device_index):
        view = torch.as_tensor(_DeviceView(tensor, device_pointer(tensor.data_ptr()), _TYPESTR[name]),
                               device=f"cuda:{device_index}")
        _compiled(torch)  # before any graph capture: capturing then records launches only
    return view


def _build() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def write_fenced(flag_ptr, seq_ptr):  # type: ignore[no-untyped-def]
        value = tl.load(seq_ptr)
        tl.store(flag_ptr, value)
        tl.inline_asm_elementwise("fence.sc.sys;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def write_plain(flag_ptr, seq_ptr):  # type: ignore[no-untyped-def]
        value = tl.load(seq_ptr)
        tl.store(flag_ptr, value)

    @triton.jit
    def wait(flag_ptr, seq_ptr):  # type: ignore[no-untyped-def]
        target = tl.load(seq_ptr, volatile=True)
        value = tl.load(flag_ptr, volatile=True)
        while value < target:
            value = tl.load(flag_ptr, volatile=True)

    @triton.jit
    def add_one(seq_ptr):  # type: ignore[no-untyped-def]
        tl.store(seq_ptr, tl.load(seq_ptr) + 1)

    return {"write": write_fenced, "write_plain": write_plain, "wait": wait, "add_one": add_one}


def _compiled(torch: Any) -> dict[str, Any]:
    """The kernels, compiled (and run once on scratch memory), for this process."""
    global _kernels
    with _lock:
        if _kernels is not None:
            return _kernels  # type: ignore[no-any-return]
        try:
            kernels = _build()
        except ImportError as e:
            raise ConfigError(f"stepmesh's wait kernels need Triton (torch's CUDA builds ship it): {e}") from e
        flag = torch.zeros(1, dtype=torch.int64, device="cuda")
        seq = torch.zeros(1, dtype=torch.int64, device="cuda")
        with torch.cuda.stream(torch.cuda.Stream()):
            try:
                kernels["write"][(1,)](flag, seq)
            except Exception:  # a Triton without inline PTX fences: the store alone (the kernel's end orders it)
                kernels["write"] = kernels["write_plain"]
                kernels["write"][(1,)](flag, seq)
            kernels["add_one"][(1,)](seq)
            kernels["wait"][(1,)](seq, flag)  # 1 >= 0: returns at once
        torch.cuda.synchronize()
        _kernels = kernels
        return kernels  # type: ignore[no-any-return]


def _check(name: str, t: Any, torch: Any) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_cuda or t.dtype != torch.int64 or t.numel() < 1:
        raise ArgumentError(f"{name} must be an int64 CUDA tensor (a mapped flag or a sequence tensor)")


def write_flag(flag: Any, seq: Any) -> None:
    """Queue on the current stream: ``flag[0] = seq[0]`` (fenced, for the CPU to see). Graph-capturable.

    Raises:
        ArgumentError: not int64 CUDA tensors.
        ConfigError: no CUDA or Triton here.
    """
    torch = _torch()
    _check("flag", flag, torch)
    _check("seq", seq, torch)
    _compiled(torch)["write"][(1,)](flag, seq)


def wait_flag(flag: Any, seq: Any) -> None:
    """Queue on the current stream: spin until ``flag[0] >= seq[0]``. Graph-capturable.

    Raises:
        ArgumentError: not int64 CUDA tensors.
        ConfigError: no CUDA or Triton here.
    """
    torch = _torch()
    _check("flag", flag, torch)
    _check("seq", seq, torch)
    _compiled(torch)["wait"][(1,)](flag, seq)


def seq_add_one(seq: Any) -> None:
    """Queue on the current stream: ``seq[0] += 1``. Graph-capturable.

    Raises:
        ArgumentError: not an int64 CUDA tensor.
        ConfigError: no CUDA or Triton here.
    """
    torch = _torch()
    _check("seq", seq, torch)
    _compiled(torch)["add_one"][(1,)](seq)
