"""torch tensors as UCX buffers: dtype codes, byte views, validation."""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from .errors import ArgumentError
from .transport import wrap

# Wire codes of dtypes; append only (codes are part of the protocol).
_DTYPE_NAMES = (
    "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int32",
    "int64", "uint8", "int8", "int16", "float64", "bool", "complex64", "complex128",
    "uint16", "uint32", "uint64", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
)
DTYPE_CODE: dict[torch.dtype, int] = {}
CODE_DTYPE: dict[int, torch.dtype] = {}
for _code, _name in enumerate(_DTYPE_NAMES):
    _dt = getattr(torch, _name, None)
    if isinstance(_dt, torch.dtype):
        DTYPE_CODE[_dt] = _code
        CODE_DTYPE[_code] = _dt
ITEMSIZE: dict[int, int] = {c: torch.empty(0, dtype=d).element_size() for c, d in CODE_DTYPE.items()}


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's memory as a flat uint8 tensor (no copy)."""
    flat = t.reshape(-1)
    return flat if flat.dtype is torch.uint8 else flat.view(torch.uint8)


class _DeviceBytes:
    """Just enough ``__cuda_array_interface__`` for UCX to see device memory as bytes."""

    __slots__ = ("__cuda_array_interface__",)

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "strides": None, "version": 3,
        }


def as_buffer(t: torch.Tensor) -> Any:
    """A ucxx buffer over a contiguous tensor's memory, host or device, without copying.

    The wrapper holds no reference to the tensor: the caller keeps it alive for
    as long as UCX uses it. (The data path calls libucp with plain addresses;
    this serves the bench's raw-ucxx floor.)
    """
    ptr, nbytes = t.data_ptr(), t.nbytes
    return wrap(_DeviceBytes(ptr, nbytes) if t.is_cuda else (ctypes.c_uint8 * nbytes).from_address(ptr))


def copy_bytes(dst: torch.Tensor, dst_offset: int, src: torch.Tensor, src_offset: int, nbytes: int) -> None:
    """Copy raw bytes between contiguous tensors (host: memmove; device: a copy-engine copy)."""
    if not (dst.is_cuda or src.is_cuda):
        ctypes.memmove(dst.data_ptr() + dst_offset, src.data_ptr() + src_offset, nbytes)
    else:
        byte_view(dst)[dst_offset : dst_offset + nbytes].copy_(byte_view(src)[src_offset : src_offset + nbytes])


def check_tensors(name: str, tensors: Any) -> list[torch.Tensor]:
    """Validate a list argument of contiguous tensors with known dtypes.

    Raises:
        ArgumentError: naming ``name`` and the offending element.
    """
    if not isinstance(tensors, (list, tuple)):
        raise ArgumentError(f"{name} must be a list of torch.Tensor, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ArgumentError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_contiguous():
            raise ArgumentError(f"{name}[{i}] is not contiguous (call .contiguous() first)")
        if t.dtype not in DTYPE_CODE:
            raise ArgumentError(f"{name}[{i}] has dtype {t.dtype}, which stepmesh cannot send")
    return list(tensors)


def check_keys(name: str, keys: Any, count: int, count_name: str) -> list[int]:
    """Validate a list of int64 keys whose length must equal ``count``.

    Raises:
        ArgumentError: naming ``name``.
    """
    if not isinstance(keys, (list, tuple)):
        raise ArgumentError(f"{name} must be a list of int, got {type(keys).__name__}")
    if len(keys) != count:
        raise ArgumentError(f"{name} has {len(keys)} keys but {count_name} has {count} tensors")
    for i, k in enumerate(keys):
        if isinstance(k, bool) or not isinstance(k, int) or not -(2**63) <= k < 2**63:
            raise ArgumentError(f"{name}[{i}] = {k!r} is not an int64 key")
    return list(keys)


class HostBuffer:
    """A reusable host byte buffer: as a tensor, as numpy (for struct), and by address (for UCX)."""

    __slots__ = ("tensor", "raw", "ptr", "pool", "iov")

    def __init__(self, size: int, pool: BufferPool | None = None) -> None:
        self.tensor = torch.empty(size, dtype=torch.uint8)
        self.raw = self.tensor.numpy()
        self.ptr = self.tensor.data_ptr()
        self.pool = pool
        self.iov: Any = None  # a _ucp.IoVec of the message this buffer is the header of, when its user keeps one

    def put(self, pos: int, t: torch.Tensor, nbytes: int) -> None:
        """Copy the first ``nbytes`` of ``t`` into this buffer at ``pos``."""
        if t.is_cuda:
            copy_bytes(self.tensor, pos, t, 0, nbytes)
        else:
            ctypes.memmove(self.ptr + pos, t.data_ptr(), nbytes)

    def take(self, pos: int, t: torch.Tensor, nbytes: int) -> None:
        """Copy ``nbytes`` of this buffer from ``pos`` into the start of ``t``."""
        if t.is_cuda:
            copy_bytes(t, 0, self.tensor, pos, nbytes)
        else:
            ctypes.memmove(t.data_ptr(), self.ptr + pos, nbytes)

    def release(self) -> None:
        if self.pool is not None:
            self.pool.free.append(self)


class BufferPool:
    """Reusable host byte buffers of one size (allocated on first use, then recycled)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.free: list[HostBuffer] = []

    def get(self) -> HostBuffer:
        return self.free.pop() if self.free else HostBuffer(self.size, self)
