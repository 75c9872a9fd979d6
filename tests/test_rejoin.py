"""A server killed and restarted under the same rank: its workers reach it again without restarting."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import stepmesh as f
from stepmesh.testing import NodeContext, kill_session, spawn_mesh, start_command

from .conftest import FAST

HERE = Path(__file__).parent


def _node(ctx: NodeContext) -> dict:
    f.init()
    if ctx.role == "server":
        for _ in range(3):
            ((h, (t,), _),) = f.get_batch()
            f.respond([t * 2], h)
        os.kill(os.getpid(), signal.SIGKILL)
    answers: list[float] = []
    errors = 0
    deadline = time.monotonic() + 60
    while len([a for a in answers if a == 3.0]) < 5 and time.monotonic() < deadline:
        out = [torch.zeros(4)]
        try:
            f.wait(f.push_pull([torch.ones(4)], [0], out, [0]), timeout_ms=5000)
            answers.append(float(out[0][0]))
        except f.PeerError:
            errors += 1
            time.sleep(0.2)
    f.stop()
    return {"answers": answers, "peer_errors": errors}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("lane", ["0", "1"], ids=["no-lane", "lane"])
def test_restarted_server_is_reached_again_without_restarting_workers(tmp_path, lane):
    """With lanes on, the replacement's wire-up waits for a ping on the lane too, so the worker must reconnect both."""
    mesh = spawn_mesh(_node, env=dict(FAST, STEPMESH_DEVICE_LANE=lane), timeout=90)
    replacement = None
    try:
        server = mesh.children["server-0-0"].process
        server.join(60)  # it kills itself after three answers
        assert server.exitcode == -signal.SIGKILL, server.exitcode
        env = dict(
            FAST, STEPMESH_DEVICE_LANE=lane, DMLC_ROLE="server", DMLC_NODE_RANK="0", DMLC_NUM_WORKER="1", DMLC_NUM_SERVER="1",
            DMLC_GROUP_SIZE="1", DMLC_PS_ROOT_URI="127.0.0.1", DMLC_PS_ROOT_PORT=str(mesh.port),
        )
        log = open(tmp_path / "replacement.log", "w")
        replacement = start_command([sys.executable, str(HERE / "rejoin_server.py")], env, stdout=log, stderr=subprocess.STDOUT)
        replacement.wait(60)
        mesh._drain(1.0)
        results = {n: c.result for n, c in mesh.children.items() if c.done}
    finally:
        if replacement is not None and replacement.poll() is None:
            kill_session(replacement.pid)
            replacement.wait(5)
        mesh.kill()
    text = (tmp_path / "replacement.log").read_text()
    assert replacement.returncode == 0 and "RESULT replacement answered" in text, text
    worker = results.get("worker-0-0")
    assert worker is not None, (results, text)
    assert worker["answers"][:3] == [2.0, 2.0, 2.0] and worker["answers"][-5:] == [3.0] * 5, worker
    assert worker["peer_errors"] >= 1, worker
