"""The ``gloo``/``nccl`` contenders: torch.distributed send/recv of the same bytes (NCCL: each rank on its own GPU)."""

from __future__ import annotations

from typing import Any

from .common import pin, serve_ping_pong
from .model import BenchOptions

__all__ = ["dist_child", "dist_unavailable"]


def dist_child(role: str, opts: BenchOptions, conn: Any, core: int | None, store: str, backend: str) -> None:
    pin(core)
    import torch
    import torch.distributed as dist

    wl = opts.workload
    rank = 0 if role == "client" else 1
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=2)
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    send_t = torch.zeros(wl.push_bytes if rank == 0 else wl.pull_bytes, dtype=torch.uint8, device=device)
    recv_t = torch.zeros(wl.pull_bytes if rank == 0 else wl.push_bytes, dtype=torch.uint8, device=device)
    sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)

    def one() -> None:
        if rank == 0:
            dist.send(send_t, 1)
            dist.recv(recv_t, 1)
        else:
            dist.recv(recv_t, 0)
            dist.send(send_t, 0)
        sync()

    serve_ping_pong(conn, one)
    dist.destroy_process_group()


def dist_unavailable(backend: str, opts: BenchOptions) -> str:
    """Why this torch.distributed backend cannot run the workload here ('' when it can)."""
    import torch
    import torch.distributed as dist

    if backend == "gloo":
        if opts.device.startswith("cuda"):
            return "gloo moves host memory; on --device cuda the baseline is nccl"
        return "" if dist.is_gloo_available() else "this torch has no gloo"
    if not opts.device.startswith("cuda"):
        return "nccl moves device memory; run with --device cuda"
    if not dist.is_nccl_available():
        return "this torch has no NCCL"
    if torch.cuda.device_count() < 2:
        return "NCCL needs each rank on its own GPU and only one is visible"
    return ""
