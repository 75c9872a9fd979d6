"""CPU use of idle nodes: a 2 x 2 mesh where nothing happens for a while.

Phase "app idle": workers sleep in the application, servers wait in get_batch().
Phase "waiting": servers sleep before answering, workers wait in wait().
Reports each process's CPU time (all its threads, from getrusage) as a
percentage of one core over the phase.

    python benchmarks/idle_cpu.py --seconds 10 --progress blocking
"""

from __future__ import annotations

import resource
import time

import click
import torch

from stepmesh.testing import NodeContext, run_mesh


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _node(ctx: NodeContext) -> dict[str, float]:
    import stepmesh as f

    seconds = ctx.args["seconds"]
    f.init()
    out = {}
    # phase 1: application idle (workers sleep, servers block in get_batch)
    c0, t0 = _cpu(), time.monotonic()
    if ctx.role == "worker":
        time.sleep(seconds)
        h = f.push_pull([torch.ones(4)], [0], [torch.zeros(4) for _ in range(f._node.num_servers)], [0] * f._node.num_servers)
        f.wait(h)
    else:
        batch = f.get_batch()
        out["app idle"] = (_cpu() - c0) / (time.monotonic() - t0) * 100
        for handle, tensors, _ in batch:
            f.respond([tensors[0]], handle)
    if "app idle" not in out:
        out["app idle"] = (_cpu() - c0) / (time.monotonic() - t0) * 100
    f.barrier()
    # phase 2: workers block in wait() while servers take their time
    c0, t0 = _cpu(), time.monotonic()
    if ctx.role == "worker":
        h = f.push_pull([torch.ones(4)], [0], [torch.zeros(4) for _ in range(f._node.num_servers)], [0] * f._node.num_servers)
        f.wait(h, timeout_ms=int(seconds * 1000) + 30000)
    else:
        time.sleep(seconds)
        for handle, tensors, _ in f.get_batch():
            f.respond([tensors[0]], handle)
    out["waiting"] = (_cpu() - c0) / (time.monotonic() - t0) * 100
    f.stop()
    return out


@click.command()
@click.option("--seconds", type=float, default=10.0, show_default=True)
@click.option("--progress", type=click.Choice(["blocking", "polling", "thread"]), default="blocking", show_default=True)
def main(seconds: float, progress: str) -> None:
    env = {"STEPMESH_PROGRESS": progress, "UCX_WARN_UNUSED_ENV_VARS": "n"}
    results = run_mesh(_node, num_workers=2, num_servers=2, env=env, args={"seconds": seconds}, timeout=4 * seconds + 120)
    results.pop("scheduler")
    click.echo(f"CPU use, % of one core, over {seconds:.0f} s idle phases ({progress} progress):")
    for name, r in sorted(results.items()):
        click.echo(f"  {name:<12} app idle {r['app idle']:5.2f} %   waiting in the library {r['waiting']:5.2f} %")


if __name__ == "__main__":
    main()
