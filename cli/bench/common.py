"""What every contender's processes share: pinning, the command loop, the UCX options of the data path."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

__all__ = ["data_options", "pin", "serve_commands", "serve_ping_pong"]


def data_options() -> dict[str, str]:
    """The UCX options of stepmesh's data workers in this environment (the floors run with them too).

    Raises:
        ConfigError: a STEPMESH_*/DMLC_* variable is invalid (the mesh would refuse it as well).
    """
    from stepmesh import Config
    from stepmesh.data import wire

    return {**wire.UCX_OPTIONS, **Config.from_env().ucx_options()}


def pin(core: int | None) -> None:
    """Pin this process to the ``core``-th core it may use (None: leave it)."""
    if core is not None and hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {allowed[core % len(allowed)]})


def serve_commands(conn: Any, step: Callable[[int], Any]) -> None:
    """Answer ("run", n) commands with step(n) until ("stop",)."""
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        conn.send(step(msg[1]))


def serve_ping_pong(conn: Any, one: Callable[[], None]) -> None:
    """A baseline's child: one exchange to wire up, then timed rounds of ``one()`` on command."""
    one()

    def run(n: int) -> dict[str, Any]:
        lat = []
        t_begin = time.perf_counter_ns()
        for _ in range(n):
            t0 = time.perf_counter_ns()
            one()
            lat.append(time.perf_counter_ns() - t0)
        return {"lat": lat, "seconds": (time.perf_counter_ns() - t_begin) / 1e9}

    conn.send("ready")
    serve_commands(conn, run)
