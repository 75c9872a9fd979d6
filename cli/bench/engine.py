"""Runs the contenders in interleaved rounds (A B A B ...), so that machine drift hits all alike.

Contenders are sets of processes that stay alive for the whole run and are
driven round by round over pipes; processes not in their round block on the
pipe and take no CPU from the one being measured. ``perftest`` starts a fresh
pair of ``ucx_perftest`` processes in its turn.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .common import data_options
from .dist import dist_child, dist_unavailable
from .model import BenchOptions, BenchResult, ContenderResult, Environment
from .nixl import nixl_child
from .perftest import Perftest, find_perftest
from .protocol import protocol_child
from .raw_ucxx import ucxx_child
from .stepmesh_node import stepmesh_node

__all__ = ["run_bench", "STAGES", "unavailable"]

_SPAWN = mp.get_context("spawn")
_READY_TIMEOUT_S = 120.0

#: The parts of a round trip, from fetch_trace's stamps (index pairs).
STAGES = (
    ("request send", 0, 1),
    ("request network", 1, 2),
    ("server queue+compute", 2, 4),
    ("response send", 4, 5),
    ("response network+wait", 5, 6),
)


@dataclass
class _Contender:
    name: str
    drivers: list[Any]  # connections that measure (their results are kept)
    helpers: list[Any]  # connections that only answer
    processes: list[Any]
    mesh: Any = None
    perftest: Perftest | None = None


def _recv(conn: Any, timeout: float, what: str, mesh: Any = None) -> Any:
    """The next message on ``conn``; fails early if a process of ``mesh`` died."""
    deadline = time.monotonic() + timeout
    while not conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
        if mesh is not None:
            mesh.check()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"bench: no answer from {what} within {timeout:.0f} s")
    return conn.recv()


class _Unavailable(Exception):
    """A baseline that cannot run here (the reason becomes its note)."""


def _start_pair(name: str, target: Callable[..., None], opts: BenchOptions, *extra: Any) -> _Contender:
    cores = (0, 1) if opts.pin else (None, None)
    conns, procs = [], []
    for role, core in zip(("client", "server"), cores):
        mine, theirs = _SPAWN.Pipe()
        p = _SPAWN.Process(target=target, args=(role, opts, theirs, core, *extra), daemon=True, name=f"{name}-{role}")
        p.start()
        conns.append(mine)
        procs.append(p)
    if name in ("ucxx", "protocol", "nixl"):  # exchange what reaches each side: worker addresses; NIXL metadata
        a = _recv(conns[0], _READY_TIMEOUT_S, f"{name} client")
        b = _recv(conns[1], _READY_TIMEOUT_S, f"{name} server")
        if name == "nixl":  # ("ok", ...) or ("error", why)
            if a[0] != "ok" or b[0] != "ok":
                for p in procs:
                    p.kill()
                    p.join(timeout=5)
                raise _Unavailable(a[1] if a[0] != "ok" else b[1])
            a, b = a[1:], b[1:]
        conns[0].send(b)
        conns[1].send(a)
    return _Contender(name, [conns[0]], [conns[1]], procs)


def _start_stepmesh(opts: BenchOptions) -> _Contender:
    from stepmesh.testing import spawn_mesh

    wl = opts.workload
    names = [f"server-0-{r}" for r in range(wl.servers)] + [f"worker-0-{r}" for r in range(wl.workers)]
    pipes = {n: _SPAWN.Pipe() for n in names}
    env = {"STEPMESH_PROGRESS": opts.progress, "UCX_WARN_UNUSED_ENV_VARS": "n"}
    if opts.device.startswith("cuda"):
        env["STEPMESH_BACKEND"] = "GPU"

    def node_env(role: str, rank: int, group: int) -> dict[str, str]:
        out: dict[str, str] = {}
        if opts.pin:
            core = rank if role == "worker" else wl.workers + rank
            out.update(STEPMESH_BIND_CPU_CORE="1", STEPMESH_CPU_START_OFFSET=str(core))
        return out

    mesh = spawn_mesh(
        stepmesh_node, num_workers=wl.workers, num_servers=wl.servers, timeout=24 * 3600, env=env,
        node_env=node_env, args={"options": opts, "conns": {n: p[1] for n, p in pipes.items()}},
    )
    drivers = [pipes[n][0] for n in names if n.startswith("worker")]
    helpers = [pipes[n][0] for n in names if n.startswith("server")]
    return _Contender("stepmesh", drivers, helpers, [], mesh)


def unavailable(name: str, opts: BenchOptions) -> str:
    """Why contender ``name`` cannot run here ('' when it can): checked before anything is measured."""
    import importlib.util

    if name in ("gloo", "nccl"):
        return dist_unavailable(name, opts)
    if name == "nixl" and importlib.util.find_spec("nixl") is None:
        return "NIXL is not installed (pip install nixl)"
    if name == "perftest" and find_perftest() is None:
        return "ucx_perftest is neither in the libucx wheel nor on PATH"
    return ""


def run_bench(opts: BenchOptions, on_round: Callable[[int], None] | None = None) -> BenchResult:
    """Run every contender, ``opts.rounds`` rounds each, interleaved.

    Args:
        on_round: called after every contender's round (for a progress bar).

    Raises:
        TimeoutError: a contender stopped answering.
        stepmesh.testing.MeshError: a mesh process failed.
    """
    results = {name: ContenderResult(name) for name in opts.contenders}
    contenders: list[_Contender] = []
    tmp = tempfile.TemporaryDirectory(prefix="stepmesh-bench-")
    env = Environment.here(opts.device)
    try:
        for name in opts.contenders:
            why = unavailable(name, opts) if name != "stepmesh" else ""
            if why:
                results[name].note = f"not run: {why}"
            elif name == "stepmesh":
                contenders.append(_start_stepmesh(opts))
            elif name == "ucxx":
                contenders.append(_start_pair("ucxx", ucxx_child, opts))
            elif name == "protocol":
                contenders.append(_start_pair("protocol", protocol_child, opts))
            elif name in ("gloo", "nccl"):
                contenders.append(_start_pair(name, dist_child, opts, os.path.join(tmp.name, f"{name}.store"), name))
            elif name == "nixl":
                try:
                    contenders.append(_start_pair("nixl", nixl_child, opts))
                except _Unavailable as e:
                    results[name].note = f"not run: NIXL failed to start: {e}"
            elif name == "perftest":
                found = find_perftest()
                assert found is not None
                contenders.append(_Contender("perftest", [], [], [], perftest=Perftest(opts, *found)))
            else:
                raise ValueError(f"unknown contender {name!r}")
        for c in contenders:
            for conn in c.drivers + c.helpers:
                _recv(conn, _READY_TIMEOUT_S, f"{c.name} start-up", c.mesh)
        per_round = max(1, opts.iters // opts.rounds)
        for r in range(opts.rounds + 1):  # round 0 is the warm-up
            n = opts.warmup if r == 0 else per_round
            for c in contenders:
                if c.perftest is not None:
                    if r == 0:
                        continue
                    try:
                        rt, seconds = c.perftest.round(n)
                    except RuntimeError as e:
                        results[c.name].note = f"not run: {e}"
                        contenders.remove(c)
                        continue
                    res = results[c.name]
                    res.latencies_us.append(rt)
                    res.seconds += seconds
                    res.ops += n
                    if on_round is not None:
                        on_round(1)
                    continue
                for conn in c.helpers:
                    conn.send(("run", n))
                for conn in c.drivers:
                    conn.send(("run", n))
                try:
                    outs = [_recv(conn, opts.round_timeout_s, c.name, c.mesh) for conn in c.drivers]
                    for conn in c.helpers:
                        _recv(conn, opts.round_timeout_s, c.name, c.mesh)
                except TimeoutError as e:
                    if c.mesh is not None:  # say where every process is stuck
                        raise TimeoutError(f"{e}\n{c.mesh.dump_stacks()}") from None
                    raise
                if r == 0:
                    continue
                res = results[c.name]
                first = outs[0]
                res.latencies_us.extend(x / 1000 for x in first["lat"])
                res.seconds += first["seconds"]
                res.ops += len(first["lat"])
                if "traces" in first:
                    res.__dict__.setdefault("_traces", []).append(first["traces"])
                if on_round is not None:
                    on_round(1)
        for c in contenders:
            for conn in c.drivers + c.helpers:
                conn.send(("stop",))
        for c in contenders:
            if c.mesh is not None:
                c.mesh.join()
            for p in c.processes:
                p.join(timeout=30)
    finally:
        for c in contenders:
            if c.mesh is not None:
                c.mesh.kill()
            for p in c.processes:
                if p.is_alive():
                    p.kill()
                p.join(timeout=5)
        tmp.cleanup()
    rounds = results["stepmesh"].__dict__.pop("_traces", []) if "stepmesh" in results else []
    traces = breakdown([op for r in rounds for op in r])
    return BenchResult(opts, results, traces, data_options(), env, [breakdown(r) for r in rounds])


def breakdown(traces: list[list[list[int]]]) -> dict[str, dict[str, float]]:
    """Median microseconds of each part of the round trip, per server."""
    out: dict[str, dict[str, float]] = {}
    if not traces:
        return out
    for s in range(len(traces[0])):
        out[f"server {s}"] = {
            name: statistics.median((op[s][b] - op[s][a]) / 1000 for op in traces) for name, a, b in STAGES
        }
    return out
