"""Time the bring-up and stop of a local mesh (default 1 scheduler + 4 servers + 4 workers).

Prints the wall time from spawning the processes to every one having exited,
and, inside the nodes, how long init() and stop() took (slowest node).

    python benchmarks/bringup.py --workers 4 --servers 4 --progress blocking
"""

from __future__ import annotations

import time

import click

from stepmesh.testing import NodeContext, run_mesh


def _node(ctx: NodeContext) -> dict[str, float]:
    t0 = time.perf_counter()
    import stepmesh

    t1 = time.perf_counter()
    stepmesh.init()
    t2 = time.perf_counter()
    stepmesh.barrier()
    t3 = time.perf_counter()
    stepmesh.stop()
    t4 = time.perf_counter()
    return {"import": t1 - t0, "init": t2 - t1, "barrier": t3 - t2, "stop": t4 - t3}


@click.command()
@click.option("--workers", type=int, default=4, show_default=True)
@click.option("--servers", type=int, default=4, show_default=True)
@click.option("--progress", type=click.Choice(["blocking", "polling", "thread"]), default="blocking", show_default=True)
@click.option("--repeat", type=int, default=3, show_default=True)
def main(workers: int, servers: int, progress: str, repeat: int) -> None:
    env = {"STEPMESH_PROGRESS": progress, "UCX_WARN_UNUSED_ENV_VARS": "n"}
    for i in range(repeat):
        t0 = time.perf_counter()
        results = run_mesh(_node, num_workers=workers, num_servers=servers, env=env, timeout=120)
        wall = time.perf_counter() - t0
        results.pop("scheduler")
        worst = {k: max(r[k] for r in results.values()) for k in ("import", "init", "barrier", "stop")}
        click.echo(
            f"run {i + 1}: 1 scheduler + {servers} servers + {workers} workers ({progress}): "
            f"spawn to all exited {wall:.2f} s; slowest node: import {worst['import']:.2f} s, "
            f"init {worst['init']:.2f} s, barrier {worst['barrier'] * 1000:.1f} ms, stop {worst['stop'] * 1000:.1f} ms"
        )


if __name__ == "__main__":
    main()
