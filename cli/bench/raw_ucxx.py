"""The ``ucxx`` contender: raw ucxx tag ping-pong of the same bytes, one message each way, the receive pre-posted.

Endpoints come from worker addresses, as stepmesh's do; on CUDA the buffers
are cupy's where cupy is installed (what ucxx's own benchmarks use), else torch's.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from typing import Any

from .common import data_options, pin, serve_ping_pong
from .model import BenchOptions

__all__ = ["ucxx_child", "as_buffer"]


class _DeviceBytes:
    """Just enough ``__cuda_array_interface__`` for UCX to see device memory as bytes."""

    __slots__ = ("__cuda_array_interface__",)

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "strides": None, "version": 3,
        }


def as_buffer(t: Any) -> Any:
    """A ucxx buffer over a contiguous tensor's memory, host or device, without copying (keep ``t`` alive)."""
    from stepmesh.control.transport import wrap

    ptr, nbytes = t.data_ptr(), t.nbytes
    return wrap(_DeviceBytes(ptr, nbytes) if t.is_cuda else (ctypes.c_uint8 * nbytes).from_address(ptr))


def ucxx_child(role: str, opts: BenchOptions, conn: Any, core: int | None) -> None:
    pin(core)
    import torch

    from stepmesh.control import transport as T

    wl = opts.workload
    tp = T.Transport(data_options(), opts.progress)
    conn.send(tp.address)
    ep = tp.connect(conn.recv())
    n_send = wl.push_bytes if role == "client" else wl.pull_bytes
    n_recv = wl.pull_bytes if role == "client" else wl.push_bytes
    keep: list[Any]
    if opts.device.startswith("cuda") and _has("cupy"):  # the reference floor: cupy buffers
        import cupy

        keep = [cupy.zeros(n_send, dtype=cupy.uint8), cupy.zeros(n_recv, dtype=cupy.uint8)]
        send_b, recv_b = T.wrap(keep[0]), T.wrap(keep[1])
    else:
        keep = [torch.zeros(n, dtype=torch.uint8, device=opts.device) for n in (n_send, n_recv)]
        send_b, recv_b = as_buffer(keep[0]), as_buffer(keep[1])
    out_tag, in_tag = (tp.tag(1), tp.tag(2)) if role == "client" else (tp.tag(2), tp.tag(1))
    forever = time.monotonic() + 3600
    progress = tp.worker.progress

    def until(done: Callable[[], bool]) -> None:
        if tp.mode == "polling":  # as ucxx's own users busy-poll
            while not done():
                progress()
        else:
            tp.progress_until(done, forever)

    def one() -> None:
        r = ep.tag_recv(recv_b, in_tag)
        if role != "client":
            until(lambda: r.completed)
        s = ep.tag_send(send_b, out_tag)
        until(lambda: r.completed and s.completed)

    serve_ping_pong(conn, one)
    tp.close()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
