"""Where a CPU `small` round trip goes, call by call: the median of each call's own time (ns), through stepmesh's
functions and straight into the compiled core; 1 worker x 1 server, 8 KiB each way, polling.

    python benchmarks/small_calls.py      (about 20 s on the 2-core VM; run it alone)
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import time

import torch

import stepmesh as f
from stepmesh.testing import NodeContext, run_mesh

N = 2048  # float32: 8 KiB
ITERS = 4000
WARMUP = 200


def _worker() -> dict[str, float]:
    pc = time.perf_counter_ns
    push, pull = [torch.ones(N)], [torch.zeros(N)]
    calls, waits = [], []
    for i in range(WARMUP + ITERS):
        t0 = pc()
        h = f.push_pull(push, [0], pull, [0])
        t1 = pc()
        f.wait(h)
        if i >= WARMUP:
            calls.append(t1 - t0)
            waits.append(pc() - t1)
    core = f._worker("small_calls")._core
    core_calls, core_waits = [], []
    for _ in range(ITERS):  # the same plan, straight into the core
        t0 = pc()
        h = core.push_pull(push, [0], pull, [0], True)
        t1 = pc()
        while core.wait(h, 1 << 20) != 0:
            pass
        core_calls.append(t1 - t0)
        core_waits.append(pc() - t1)
    med = statistics.median
    return {
        "push_pull": med(calls), "wait": med(waits), "round trip": med(a + b for a, b in zip(calls, waits)),
        "core.push_pull": med(core_calls), "core.wait": med(core_waits),
        "core round trip": med(a + b for a, b in zip(core_calls, core_waits)),
    }


def _server() -> dict[str, float]:
    pc = time.perf_counter_ns
    core = f._server("small_calls")._core
    batches, through_f, into_core = [], [], []
    for i in range(WARMUP + 2 * ITERS):
        t0 = pc()
        ((h, ts, _),) = f.get_batch()
        t1 = pc()
        if i % 2:
            f.respond(ts, h)
        else:
            core.respond(ts, h, True)
        if i >= WARMUP:
            batches.append(t1 - t0)
            (through_f if i % 2 else into_core).append(pc() - t1)
    med = statistics.median
    return {"get_batch (waiting included)": med(batches), "respond": med(through_f), "core.respond": med(into_core)}


def target(ctx: NodeContext) -> dict[str, float]:
    f.init()
    out = _worker() if ctx.role == "worker" else _server()
    f.stop()
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from tests.conftest import mesh_env

    results = run_mesh(target, env=mesh_env("cpu", {"STEPMESH_PROGRESS": "polling"}), timeout=300, args={})
    for name, value in sorted(results.items()):
        if value is not None:
            print(name, {k: round(v / 1000, 2) for k, v in value.items()}, "(us)")
