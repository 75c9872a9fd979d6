"""The ``stepmesh`` contender: a real mesh (scheduler, servers, workers) doing push_pull, stages kept in flight."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from .common import serve_commands
from .model import BenchOptions

__all__ = ["stepmesh_node"]


def stepmesh_node(ctx: Any) -> None:
    """One node of the benchmark's mesh (run by ``stepmesh.testing.spawn_mesh``)."""
    import torch

    import stepmesh as f

    opts: BenchOptions = ctx.args["options"]
    conn = ctx.args["conns"][f"{ctx.role}-{ctx.group}-{ctx.rank}"]
    wl = opts.workload
    dev = opts.device
    f.init()
    info = f.node_info()
    if ctx.role == "server":
        answers = [t.make(dev, 7) for t in wl.pull]
        for i, t in enumerate(wl.push):  # one registered chunk per (worker, stage) of each key, StepMesh-style
            pairs = [(w, i + 1000 * s) for w in range(info.num_workers) for s in range(opts.stages)]
            pool = torch.empty(t.nbytes * len(pairs), dtype=torch.uint8, device=dev)
            f.register_recv_buffer(pool, [w for w, _ in pairs], [k for _, k in pairs])

        def serve(n: int) -> str:
            for _ in range(n):
                for handle, _tensors, _keys in f.get_batch():
                    f.respond(answers, handle)
            f.flush()  # the last answers must arrive while this waits for the next round
            return "done"

        conn.send("ready")
        serve_commands(conn, serve)
    else:
        servers = info.num_servers
        stages = [
            (
                [t.make(dev, i) for i, t in enumerate(wl.push)],
                [k + 1000 * s for k in range(len(wl.push))],
                [t.make(dev) for _ in range(servers) for t in wl.pull],
                [k + 1000 * s for _ in range(servers) for k in range(len(wl.pull))],
            )
            for s in range(opts.stages)
        ]

        def issue(s: int) -> tuple[int, int, int]:
            push, pkeys, pull, qkeys = stages[s]
            t0 = time.perf_counter_ns()
            return f.push_pull(push, pkeys, pull, qkeys, need_event=opts.need_event), t0, s

        def run(n: int) -> dict[str, Any]:
            # A rolling pipeline, as an attention instance runs its micro-batches:
            # the oldest stage is waited for and at once sent again, so `stages`
            # push_pulls stay in flight until the last ones drain.
            lat: list[int] = []
            done: list[int] = []
            t_begin = time.perf_counter_ns()
            in_flight = deque(issue(s) for s in range(min(opts.stages, n)))
            issued = len(in_flight)
            while in_flight:
                h, t0, s = in_flight.popleft()
                f.wait(h)
                lat.append(time.perf_counter_ns() - t0)
                done.append(h)
                if issued < n:
                    in_flight.append(issue(s))
                    issued += 1
            seconds = (time.perf_counter_ns() - t_begin) / 1e9
            # Traces are read once the round is timed (stepmesh keeps the last 4096 push_pulls').
            traces = [[f.fetch_trace(h, server=s) for s in range(servers)] for h in done[-4096:]] if opts.traces else []
            return {"lat": lat, "seconds": seconds, "traces": traces}

        conn.send("ready")
        serve_commands(conn, run)
    f.stop()
