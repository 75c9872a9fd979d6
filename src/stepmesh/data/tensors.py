"""torch tensors on the wire: dtype codes, byte views, and the checks that name a bad argument."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ArgumentError
from .wire import MAX_NDIM

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
        if t.is_conj() or t.is_neg():
            raise ArgumentError(f"{name}[{i}] is a lazily conjugated or negated view (call .resolve_conj() "
                                f"and .resolve_neg() first)")
        if t.device.type not in ("cpu", "cuda"):
            raise ArgumentError(f"{name}[{i}] is on {t.device}; stepmesh moves host and CUDA/ROCm memory")
        if t.dim() > MAX_NDIM:
            raise ArgumentError(f"{name}[{i}] has {t.dim()} dimensions, more than {MAX_NDIM}")
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
    return [int(k) for k in keys]


def one_device(named: list[tuple[str, list[torch.Tensor]]]) -> int:
    """The index of the one GPU the device tensors among ``named`` live on; -1 when all are in host memory.

    Raises:
        ArgumentError: device tensors on two GPUs (one call uses one device's stream).
    """
    found: tuple[int, str] | None = None
    for name, ts in named:
        for i, t in enumerate(ts):
            if t.device.type != "cpu":
                index = t.get_device()
                if found is None:
                    found = (index, f"{name}[{i}]")
                elif found[0] != index:
                    raise ArgumentError(
                        f"{name}[{i}] is on {t.device} but {found[1]} on cuda:{found[0]}: one call's device "
                        "tensors must share a GPU"
                    )
    return -1 if found is None else found[0]
