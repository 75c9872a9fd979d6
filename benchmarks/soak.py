"""Soak: many push_pulls in a 2 x 2 mesh; memory (RSS) and open file descriptors must not grow.

    python benchmarks/soak.py --iters 100000

Each process reports its RSS and fd count after a warm-up and at the end.
"""

from __future__ import annotations

import os
import time

import click
import torch

from stepmesh.testing import NodeContext, run_mesh


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def soak_node(ctx: NodeContext) -> dict[str, float]:
    import stepmesh as f

    iters, warmup = ctx.args
    f.init()
    node = f._node
    out: dict[str, float] = {}
    if ctx.role == "worker":
        servers = node.num_servers
        stages = []
        for _ in range(3):  # StepMesh's 3 micro-batch stages, dynamic lengths
            push = [torch.randn(128, 1024).to(torch.bfloat16), torch.tensor([128], dtype=torch.int32)]
            pull = [torch.zeros(128, 1024, dtype=torch.bfloat16) for _ in range(servers)]
            stages.append((push, pull))
        t0 = time.monotonic()
        for i in range(iters + warmup):
            if i == warmup:
                out["rss_start_mb"], out["fds_start"] = _rss_mb(), _fds()
            s = i % 3
            push, pull = stages[s]
            rows = 1 + (i * 37) % 128
            h = f.push_pull([push[0][:rows], push[1]], [10 * s, 10 * s + 1], pull, [s] * servers)
            f.wait(h)
        out["seconds"] = time.monotonic() - t0
    else:
        ans = torch.ones(128, 1024, dtype=torch.bfloat16)
        for i in range(iters + warmup):
            if i == warmup:
                out["rss_start_mb"], out["fds_start"] = _rss_mb(), _fds()
            for h, (hidden, _count), _ in f.get_batch():
                f.respond([ans[: hidden.shape[0]]], h)
    out["rss_end_mb"], out["fds_end"] = _rss_mb(), _fds()
    f.stop()
    return out


def run_soak(iters: int, warmup: int = 1000, progress: str = "blocking") -> dict[str, dict[str, float]]:
    results = run_mesh(
        soak_node,
        num_workers=2,
        num_servers=2,
        env={"STEPMESH_PROGRESS": progress, "UCX_WARN_UNUSED_ENV_VARS": "n"},
        args=(iters, warmup),
        timeout=3600,
    )
    results.pop("scheduler")
    return results


@click.command()
@click.option("--iters", type=int, default=100_000, show_default=True, help="push_pulls per worker.")
@click.option("--progress", type=click.Choice(["blocking", "polling"]), default="blocking", show_default=True)
def main(iters: int, progress: str) -> None:
    results = run_soak(iters, progress=progress)
    click.echo(f"soak: {iters} push_pulls per worker, 2 workers x 2 servers, {progress} progress")
    for name, r in sorted(results.items()):
        extra = f", {iters / r['seconds']:.0f} push_pulls/s" if "seconds" in r else ""
        click.echo(
            f"  {name:<12} RSS {r['rss_start_mb']:.1f} -> {r['rss_end_mb']:.1f} MB "
            f"({r['rss_end_mb'] - r['rss_start_mb']:+.2f}), fds {int(r['fds_start'])} -> {int(r['fds_end'])}{extra}"
        )


if __name__ == "__main__":
    main()
