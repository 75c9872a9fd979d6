"""A peer killed with SIGKILL: survivors get PeerError naming it within 3 s, and stop() still returns."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import stepmesh as f
from stepmesh.testing import Mesh, NodeContext, spawn_mesh

BOUND_S = 3.0  # the bound, with the default heartbeat settings


def _server_dies(ctx: NodeContext) -> dict:
    f.init()
    f.barrier()
    if ctx.role == "server" and ctx.rank == 1:
        time.sleep(0.3)  # the worker is already waiting for this server
        os.kill(os.getpid(), ctx.args)
    out: dict = {}
    if ctx.role == "worker":
        t0 = time.monotonic()
        try:  # raised by push_pull when the death is known already, else by wait
            f.wait(f.push_pull([torch.ones(8)], [0], [torch.zeros(8), torch.zeros(8)], [0, 0]), timeout_ms=20000)
            out["error"] = None
        except f.PeerError as e:
            out["error"] = str(e)
            out["role"], out["rank"] = e.role, e.rank
        out["after_s"] = time.monotonic() - t0 - 0.3
        with pytest.raises(f.PeerError):  # and every later call that needs it
            f.push_pull([torch.ones(8)], [0], [torch.zeros(8), torch.zeros(8)], [0, 0])
    else:
        batch = f.get_batch(timeout_ms=20000)
        for h, (t,), _ in batch:
            f.respond([t], h)
    t0 = time.monotonic()
    f.stop()
    out["stop_s"] = time.monotonic() - t0
    return out


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_dead_server_is_a_peer_error_within_3_s_and_stop_returns(how):
    """SIGKILL: its connections close. SIGSTOP: a host that vanished, only heartbeats tell."""
    mesh = spawn_mesh(
        _server_dies, num_workers=1, num_servers=2, env={"UCX_WARN_UNUSED_ENV_VARS": "n"}, timeout=60, args=how
    )
    try:
        results = mesh.join(expect_failure=True) if how == signal.SIGKILL else _join_frozen(mesh)
    finally:
        mesh.kill()
    if how == signal.SIGKILL:
        assert "exited with code -9" in results["server-0-1"]
    worker = results["worker-0-0"]
    assert isinstance(worker, dict), worker
    assert worker["error"] and (worker["role"], worker["rank"]) == ("server", 1), worker
    assert worker["after_s"] < BOUND_S, worker
    assert worker["stop_s"] < 10 and results["server-0-0"]["stop_s"] < 10, results
    assert results["scheduler"] is None, results["scheduler"]


def _join_frozen(mesh: Mesh) -> dict:
    """Wait for every child but the frozen server, which never finishes."""
    deadline = time.monotonic() + 45
    while time.monotonic() < deadline:
        mesh._drain(0.1)
        others = [c for n, c in mesh.children.items() if n != "server-0-1"]
        if all(c.done or c.error for c in others):
            break
    return {n: (c.result if c.done else c.error) for n, c in mesh.children.items()}
