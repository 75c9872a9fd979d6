"""A peer killed with SIGKILL: survivors get PeerError naming it within 3 s, and stop() still returns."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import stepmesh as f
from stepmesh.testing import Mesh, NodeContext, free_port, run_command, run_mesh, spawn_mesh

from .conftest import FAST

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


def _scheduler_dies(ctx: NodeContext) -> dict:
    f.init()
    if ctx.role == "worker":
        with open(ctx.args) as fh:
            os.kill(int(fh.read()), signal.SIGKILL)
    t0 = time.monotonic()
    try:
        f.barrier(timeout_ms=20000)
        error = None
    except f.StepMeshError as e:
        error = f"{type(e).__name__}: {e}"
    after = time.monotonic() - t0
    t0 = time.monotonic()
    f.stop()
    return {"error": error, "after_s": after, "stop_s": time.monotonic() - t0}


@pytest.mark.timeout(90)
def test_lost_scheduler_is_a_peer_error_within_3_s(tmp_path):
    pid_file = tmp_path / "scheduler.pid"
    mesh = spawn_mesh(_scheduler_dies, env={"UCX_WARN_UNUSED_ENV_VARS": "n"}, timeout=60, args=str(pid_file))
    pid_file.write_text(str(mesh.children["scheduler"].process.pid))
    try:
        results = mesh.join(expect_failure=True)
    finally:
        mesh.kill()
    for name in ("server-0-0", "worker-0-0"):
        r = results[name]
        assert isinstance(r, dict) and r["error"].startswith("PeerError") and "scheduler" in r["error"], (name, r)
        assert r["after_s"] < BOUND_S and r["stop_s"] < 5, (name, r)


def _lonely_barrier(ctx: NodeContext) -> str:
    f.init()
    result = "no barrier"
    if ctx.rank == 0 and ctx.role == "worker":
        t0 = time.monotonic()
        with pytest.raises(f.TimeoutError, match="barrier"):
            f.barrier(False, True, timeout_ms=800)  # worker 1 never comes
        result = f"timed out after {time.monotonic() - t0:.1f} s"
    f.stop()
    return result


@pytest.mark.timeout(90)
def test_a_barrier_that_never_fills_times_out():
    results = run_mesh(_lonely_barrier, num_workers=2, env=FAST, timeout=60)
    assert results["worker-0-0"].startswith("timed out after 0.") or results["worker-0-0"].startswith(
        "timed out after 1."
    ), results


def test_unreachable_scheduler_is_a_bounded_timeout():
    port = free_port()  # a port nobody listens on
    cfg = f.Config(
        role="worker", root_uri="127.0.0.1", root_port=port, num_workers=1, num_servers=1, init_timeout_ms=1500
    )
    t0 = time.monotonic()
    with pytest.raises(f.TimeoutError, match="cannot reach the scheduler"):
        f.AFTensorWorker(cfg).start()
    assert time.monotonic() - t0 < 10


def test_waiting_for_a_scheduler_not_up_yet_is_quiet():
    """Retries probe the port first: no UCX ERROR line per refused attempt, one clear error at the end."""
    import sys

    port = free_port()  # a port nobody listens on
    env = {
        "DMLC_ROLE": "worker", "DMLC_NUM_WORKER": "1", "DMLC_NUM_SERVER": "1", "DMLC_PS_ROOT_URI": "127.0.0.1",
        "DMLC_PS_ROOT_PORT": str(port), "STEPMESH_INIT_TIMEOUT_MS": "1500",
    }
    r = run_command([sys.executable, "-c", "import stepmesh; stepmesh.init()"], timeout=60, env=env)
    assert r.returncode != 0
    assert "cannot reach the scheduler" in r.stderr and "Connection refused" in r.stderr, r.stderr
    assert "ERROR" not in r.stderr.replace("TimeoutError", ""), r.stderr
