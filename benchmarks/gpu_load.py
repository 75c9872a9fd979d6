"""Keep one GPU busy from a process of its own, to see what a shared GPU's slow spells do to a round trip.

    python benchmarks/gpu_load.py {matmul,h2d,d2d} [--seconds S]

``matmul`` fills the SMs (back-to-back 8192x8192 bf16 matmuls), ``h2d`` the copy engines (1 GiB from pinned
host memory, again and again), ``d2d`` the memory bandwidth (1 GiB copied on the device). It prints ``ready`` once
its first round has run and stops after ``--seconds`` (or when killed).
"""

from __future__ import annotations

import time

import click


@click.command()
@click.argument("kind", type=click.Choice(["matmul", "h2d", "d2d"]))
@click.option("--seconds", type=click.FloatRange(min=1), default=120.0, show_default=True, help="Stop after this long.")
def main(kind: str, seconds: float) -> None:
    """Load the GPU with KIND until killed or SECONDS have passed."""
    import torch

    if kind == "matmul":
        a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        step = lambda: torch.mm(a, a)
    elif kind == "h2d":
        src = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        step = lambda: dst.copy_(src, non_blocking=True)
    else:
        src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        step = lambda: dst.copy_(src)
    step()
    torch.cuda.synchronize()
    print(f"gpu_load: {kind} ready", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(8):
            step()
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
