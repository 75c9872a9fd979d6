"""STEPMESH_AUTH_TOKEN: nodes join only by proving they know it; the token never travels or shows."""

from __future__ import annotations

import pytest
import torch

import stepmesh as f
from stepmesh.testing import NodeContext, run_mesh

from .conftest import FAST

TOKEN = "s3cret-Token-for-this-test"


def _join(ctx: NodeContext) -> str:
    try:
        f.init()
    except f.StepMeshError as e:
        return f"{type(e).__name__}: {e}"
    if ctx.role == "worker":
        out = [torch.zeros(4)]
        f.wait(f.push_pull([torch.ones(4)], [0], out, [0]))
        assert torch.all(out[0] == 1)
    else:
        (h, (t,), _), = f.get_batch()
        f.respond([t], h)
    f.stop()
    return "joined"


@pytest.mark.timeout(90)
def test_every_node_with_the_token_joins_and_works():
    results = run_mesh(_join, env=dict(FAST, STEPMESH_AUTH_TOKEN=TOKEN), timeout=60)
    assert results == {"scheduler": None, "server-0-0": "joined", "worker-0-0": "joined"}


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("worker_token", "message"),
    [("not-the-token", "does not match"), (None, "requires authentication")],
    ids=["wrong-token", "no-token"],
)
def test_a_node_without_the_token_gets_auth_error_and_no_addresses(worker_token, message, tmp_path):
    env = dict(FAST, STEPMESH_AUTH_TOKEN=TOKEN, STEPMESH_INIT_TIMEOUT_MS="6000")
    results = run_mesh(
        _join,
        env=env,
        node_env=lambda role, rank, group: {"STEPMESH_AUTH_TOKEN": worker_token} if role == "worker" else {},
        timeout=60,
        expect_failure=True,
    )
    assert results["worker-0-0"].startswith("AuthError") and message in results["worker-0-0"], results
    # the server, which did authenticate, is told the mesh never completed: no book was handed out
    assert results["server-0-0"].startswith("TimeoutError"), results
    for text in results.values():
        assert TOKEN not in str(text)


def _plain(ctx: NodeContext) -> str:
    return _join(ctx)


@pytest.mark.timeout(90)
def test_strangers_sending_garbage_or_hanging_up_do_not_disturb_the_mesh():
    import time

    from stepmesh.control import messages as P
    from stepmesh.control.transport import ControlChannel, Transport
    from stepmesh.testing import spawn_mesh

    mesh = spawn_mesh(_plain, env=FAST, timeout=60)
    try:
        stranger = Transport({}, "polling", active_messages=True)
        garbage = ControlChannel(stranger, stranger.connect_listener("127.0.0.1", mesh.port))
        garbage.send(b"\x00\xffnot a stepmesh message" * 10)
        half = ControlChannel(stranger, stranger.connect_listener("127.0.0.1", mesh.port))
        half.send(P.encode_register(P.Registration(
            version="0", role=P.Role.WORKER, rank=0, group=0, gpu=0, pid=1, host="stranger",
            address=b"x", num_workers=1, num_servers=1, group_size=1, topology="group",
        ))[:20])  # a registration cut short
        t_end = time.monotonic() + 2
        while time.monotonic() < t_end:
            stranger.progress_once()
        half.close()
        results = mesh.join()
    finally:
        mesh.kill()
    assert results == {"scheduler": None, "server-0-0": "joined", "worker-0-0": "joined"}


@pytest.mark.timeout(90)
def test_a_node_with_a_token_refuses_a_scheduler_that_never_asks_for_it():
    results = run_mesh(
        _join,
        env=dict(FAST, STEPMESH_INIT_TIMEOUT_MS="6000"),  # the scheduler has no token
        node_env=lambda role, rank, group: {"STEPMESH_AUTH_TOKEN": TOKEN} if role == "worker" else {},
        timeout=60,
        expect_failure=True,
    )
    assert results["worker-0-0"].startswith("AuthError") and "did not ask" in results["worker-0-0"], results


@pytest.mark.timeout(60)
def test_a_node_refuses_a_scheduler_that_accepts_its_proof_without_knowing_the_token(monkeypatch):
    """Mutual authentication: a scheduler that waves every proof through cannot prove itself."""
    import types

    from stepmesh.control import scheduler as S

    monkeypatch.setattr(S, "hmac", types.SimpleNamespace(compare_digest=lambda a, b: True))
    sched = S.Scheduler(f.Config(role="scheduler", root_port=0, num_workers=1, num_servers=1, auth_token="a guess"))
    port = sched.start()
    try:
        cfg = f.Config(
            role="worker", root_uri="127.0.0.1", root_port=port, num_workers=1, num_servers=1,
            init_timeout_ms=5000, auth_token=TOKEN,
        )
        with pytest.raises(f.AuthError, match="could not prove"):
            f.AFTensorWorker(cfg).start()
    finally:
        with pytest.raises(f.PeerError, match="every node of the mesh died"):  # the refused worker left
            sched.stop(timeout_ms=5000)
