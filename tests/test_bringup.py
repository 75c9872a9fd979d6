"""Bring-up, barriers and stop of real meshes over UCX on loopback."""

from __future__ import annotations

import os
import time

import pytest
import torch

import stepmesh
import stepmesh as f
from stepmesh.testing import NodeContext, run_mesh, spawn_mesh

from .conftest import FAST


def _join_barrier_stop(ctx: NodeContext) -> dict:
    t0 = time.monotonic()
    stepmesh.init()
    node = stepmesh._node
    stepmesh.barrier(True, True)
    stepmesh.barrier(include_server=False, include_worker=True)
    stepmesh.barrier(include_server=True, include_worker=False)
    out = {
        "rank": node.rank,
        "group": node.group,
        "peers": [(p.role.label, p.rank, p.group) for p in node.peers],
        "init_s": time.monotonic() - t0,
    }
    stepmesh.stop()
    stepmesh.stop()  # idempotent
    return out


@pytest.mark.timeout(60)
def test_two_by_two_bring_up_barriers_and_stop():
    results = run_mesh(_join_barrier_stop, num_workers=2, num_servers=2, env=FAST, timeout=50)
    assert results.pop("scheduler") is None
    assert set(results) == {"server-0-0", "server-0-1", "worker-0-0", "worker-0-1"}
    for name, r in results.items():
        role = name.split("-")[0]
        other = "worker" if role == "server" else "server"
        assert r["rank"] == int(name.split("-")[2])
        assert r["peers"] == [(other, 0, 0), (other, 1, 0)], name


def _barrier_scopes(ctx: NodeContext) -> dict:
    if ctx.group == 0:
        stepmesh.init()
    marks = ctx.args
    # Group-local: group 1 never joins this one, so group 0 passes without it.
    if ctx.group == 1:
        time.sleep(1.0)  # group 1 registers late: the barrier of every group must wait for it
        stepmesh.init()
    if ctx.group == 0:
        stepmesh.barrier(True, True, False, timeout_ms=20000)
    # Every instance group (StepMesh's default): group 0 passes only once group 1 has marked and arrived.
    if ctx.group == 1:
        time.sleep(0.5)
        open(f"{marks}/{ctx.role}-{ctx.rank}", "w").close()
    stepmesh.barrier(True, True)
    seen = sorted(os.listdir(marks))
    with pytest.raises(f.ArgumentError, match="instance_barrier"):
        stepmesh.barrier(True, True, 1000)  # StepMesh's third argument is instance_barrier, not a timeout
    stepmesh.stop()
    return seen


@pytest.mark.timeout(60)
def test_barrier_spans_every_instance_group_unless_told_otherwise(tmp_path):
    results = run_mesh(_barrier_scopes, num_workers=1, num_servers=1, group_size=2, env=FAST, timeout=50,
                       args=str(tmp_path))
    results.pop("scheduler")
    assert len(results) == 4
    for name, seen in results.items():
        assert seen == ["server-0", "worker-0"], name


@pytest.mark.timeout(60)
def test_two_instance_groups_share_one_scheduler():
    results = run_mesh(_join_barrier_stop, num_workers=1, num_servers=2, group_size=2, env=FAST, timeout=50)
    results.pop("scheduler")
    assert len(results) == 6
    for name, r in results.items():
        role, group, rank = name.split("-")
        assert r["group"] == int(group)
        # every peer is of the other role and of the same group
        assert r["peers"] and all(p[2] == int(group) and p[0] != role for p in r["peers"]), r
        assert len(r["peers"]) == (2 if role == "worker" else 1)


@pytest.mark.timeout(60)
def test_full_topology_connects_across_groups():
    env = dict(FAST, STEPMESH_TOPOLOGY="full")
    results = run_mesh(_join_barrier_stop, num_workers=1, num_servers=1, group_size=2, env=env, timeout=50)
    results.pop("scheduler")
    for name, r in results.items():
        assert sorted(p[2] for p in r["peers"]) == [0, 1], (name, r)


def _init_expecting(ctx: NodeContext) -> str:
    try:
        stepmesh.init()
    except stepmesh.StepMeshError as e:
        return f"{type(e).__name__}: {e}"
    stepmesh.stop()
    return "joined"


@pytest.mark.timeout(60)
def test_missing_node_gives_a_bounded_clear_error():
    env = dict(FAST, STEPMESH_INIT_TIMEOUT_MS="6000")  # > the start-up skew of nodes on a busy 2-core box
    t0 = time.monotonic()
    results = run_mesh(
        _init_expecting,
        num_workers=2,
        num_servers=1,
        env=env,
        skip=lambda role, rank, group: role == "worker" and rank == 1,
        timeout=40,
        expect_failure=True,
    )
    assert time.monotonic() - t0 < 30
    assert "worker rank 1 of group 0" in results["scheduler"]
    for name in ("server-0-0", "worker-0-0"):
        assert results[name].startswith("TimeoutError"), results[name]
        assert "missing: worker rank 1 of group 0" in results[name]


@pytest.mark.timeout(60)
def test_duplicate_rank_is_refused_by_name():
    env = dict(FAST, STEPMESH_INIT_TIMEOUT_MS="6000")
    results = run_mesh(
        _init_expecting,
        num_workers=2,
        num_servers=1,
        env=env,
        node_env=lambda role, rank, group: {"DMLC_NODE_RANK": "0"},
        timeout=40,
        expect_failure=True,
    )
    refused = [r for n, r in results.items() if n.startswith("worker") and "duplicate rank" in r]
    assert len(refused) == 1, results
    assert refused[0].startswith("ConfigError") and "DMLC_NODE_RANK" in refused[0]


@pytest.mark.timeout(60)
def test_rank_out_of_range_and_shape_mismatch_are_refused():
    env = dict(FAST, STEPMESH_INIT_TIMEOUT_MS="6000")

    def node_env(role: str, rank: int, group: int) -> dict[str, str]:
        if role == "worker":
            return {"DMLC_NODE_RANK": "5"}
        return {"DMLC_NUM_WORKER": "3"}

    results = run_mesh(_init_expecting, num_workers=1, num_servers=1, env=env, node_env=node_env,
                       timeout=40, expect_failure=True)
    assert "out of range" in results["worker-0-0"] and "DMLC_NODE_RANK" in results["worker-0-0"]
    assert "mesh shape mismatch" in results["server-0-0"]


def _pinned(ctx: NodeContext) -> dict:
    import os

    before = sorted(os.sched_getaffinity(0))
    stepmesh.init()
    node = stepmesh._node
    out = {
        "before": before,
        "caller": sorted(os.sched_getaffinity(0)),
        "control": sorted(os.sched_getaffinity(node._thread.native_id)),
    }
    stepmesh.stop()
    return out


@pytest.mark.timeout(90)
def test_bind_cpu_core_pins_the_caller_and_leaves_the_control_thread_free():
    """STEPMESH_BIND_CPU_CORE: the caller's thread gets its core; heartbeats never compete for it."""
    results = run_mesh(
        _pinned,
        env=dict(FAST, STEPMESH_BIND_CPU_CORE="1"),
        node_env=lambda role, rank, group: {"STEPMESH_CPU_START_OFFSET": "1" if role == "worker" else "0"},
        timeout=60,
    )
    for name, offset in (("server-0-0", 0), ("worker-0-0", 1)):
        r = results[name]
        assert r["caller"] == [r["before"][offset % len(r["before"])]], r
        assert r["control"] == r["before"], r


# ------------------------------------------------------- a late instance group
def _one_round(ctx: NodeContext) -> str:
    f.init()
    if ctx.role == "worker":
        out = [torch.zeros(4)]
        f.wait(f.push_pull([torch.full((4,), float(ctx.group))], [0], out, [0]))
        assert torch.all(out[0] == ctx.group + 1)
    else:
        (h, (t,), _), = f.get_batch()
        f.respond([t + 1], h)
    t0 = time.monotonic()
    f.stop()
    return f"stopped after {time.monotonic() - t0:.1f} s"


@pytest.mark.timeout(120)
def test_a_late_instance_group_is_waited_for_by_the_stop_barrier():
    """Group 1 starts 4 s after group 0 finished its work: the scheduler's stop barrier waits for it.

    (It once covered only the nodes already registered: group 0 stopped, the
    scheduler exited, and group 1 failed to reach it 60 s later.)
    """
    mesh = spawn_mesh(_one_round, group_size=2, env=FAST, timeout=90, skip=lambda role, rank, group: group == 1)
    try:
        time.sleep(4.0)  # group 0 is in its stop barrier by now
        assert all(c.process.is_alive() for c in mesh.children.values()), "the mesh stopped without group 1"
        for role in ("server", "worker"):
            mesh.add_node(_one_round, role, 0, 1)
        results = mesh.join()
    finally:
        mesh.kill()
    results.pop("scheduler")
    assert sorted(results) == ["server-0-0", "server-1-0", "worker-0-0", "worker-1-0"]
    early = [float(results[n].split()[2]) for n in ("server-0-0", "worker-0-0")]
    assert all(t > 1.0 for t in early), results  # they waited in stop() for the late group


def test_free_port_comes_from_below_the_ephemeral_range():
    """No outgoing connection can take the port between the probe and the listener's bind (a CI run saw one)."""
    import socket

    from stepmesh.testing import free_port

    with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
        low = int(fh.read().split()[0])
    ports = {free_port() for _ in range(8)}
    assert all(1024 <= p < low for p in ports), (ports, low)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports.pop()))  # still free
