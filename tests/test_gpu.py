"""The data plane with CUDA tensors on both sides (one GPU: every process shares device 0).

Skipped, with the reason, where torch sees no CUDA device; run for real on the
GPU machine with ``python -m pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

import stepmesh as f
from stepmesh.testing import NodeContext, run_mesh

from .conftest import FAST

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; torch sees none here"),
]

SMALL, LARGE = 64, 300_000
GPU_ENV = dict(FAST, STEPMESH_BACKEND="GPU")


def _mesh(target, **kw):
    kw.setdefault("env", GPU_ENV)
    kw.setdefault("timeout", 150)
    results = run_mesh(target, **kw)
    assert results.pop("scheduler") is None
    return results


def _seed_sum(ctx: NodeContext) -> int:
    f.init()
    checked = 0
    if ctx.role == "worker":
        for n in (SMALL, LARGE):
            push = [torch.rand(n, device="cuda") for _ in range(3)]
            pull = [torch.zeros(n, device="cuda")]
            f.wait(f.push_pull(push, [0, 1, 2], pull, [3]))
            assert pull[0].is_cuda and torch.allclose(pull[0], push[0] + push[1] + push[2])
            checked += 1
    else:
        for _ in range(2):
            (h, tensors, keys), = f.get_batch()
            assert all(t.is_cuda for t in tensors), [t.device for t in tensors]
            f.respond([tensors[0] + tensors[1] + tensors[2]], h, need_event=True)
            checked += 1
    f.stop()
    return checked


@pytest.mark.timeout(200)
def test_gpu_seed_sum():
    assert set(_mesh(_seed_sum).values()) == {2}


def _mxn(ctx: NodeContext) -> int:
    f.init()
    servers = f._node.config.num_servers
    for n in (SMALL, LARGE):
        if ctx.role == "worker":
            mark = torch.full((n,), float(ctx.rank), device="cuda")
            pulls = [torch.zeros(n, device="cuda") for _ in range(servers)]
            f.wait(f.push_pull([mark], [7], pulls, [100 + s for s in range(servers)]))
            for s in range(servers):
                assert torch.equal(pulls[s], mark + 10 * s), (s, pulls[s][:3])
        else:
            batch = f.get_batch()
            for w, (h, (t,), _) in enumerate(batch):
                assert t.is_cuda and torch.all(t == w)
                f.respond([t + 10 * ctx.rank], h, need_event=True)
    f.stop()
    return 2


@pytest.mark.timeout(300)
def test_gpu_two_workers_three_servers():
    results = _mesh(_mxn, num_workers=2, num_servers=3, timeout=250)
    assert set(results.values()) == {2} and len(results) == 5


def _stages(ctx: NodeContext) -> bool:
    f.init()
    lengths = [LARGE, 17, LARGE // 3]
    if ctx.role == "worker":
        buf = torch.arange(LARGE, dtype=torch.float32, device="cuda")
        for _ in range(3):
            handles = []
            for s, length in enumerate(lengths):  # slices of one buffer: dynamic shapes
                out = torch.full((LARGE,), -1.0, device="cuda")
                handles.append((f.push_pull([buf[:length]], [s], [out], [100 + s]), out, buf[:length] * 2 + s))
            for h, out, expect in reversed(handles):
                f.wait(h)
                assert torch.equal(out[: expect.numel()], expect) and torch.all(out[expect.numel() :] == -1)
    else:
        for _ in range(3):
            batches = [f.get_batch() for _ in lengths]
            for batch in reversed(batches):  # answered out of order
                (h, (t,), (key,)), = batch
                assert t.is_cuda and t.shape[0] == lengths[key]
                f.respond([t * 2 + key], h, need_event=True)
    f.stop()
    return True


@pytest.mark.timeout(200)
def test_gpu_three_stages_dynamic_shapes():
    assert all(_mesh(_stages).values())


def _notify(ctx: NodeContext) -> bool:
    """The stream waits for the data, the CPU does not (the server answers late on purpose)."""
    import time

    f.init()
    sig = f.SimpleNotify()
    sig.init()
    with pytest.raises(f.ArgumentError, match="non-default"):
        sig.block_now_stream()  # on the legacy default stream it would deadlock UCX's copies
    if ctx.role == "server":  # no allocation while a stream waits: cudaMalloc may wait for it
        f.register_recv_buffer(torch.empty(LARGE * 4, dtype=torch.uint8, device="cuda"), [0], [0])
    side = torch.cuda.Stream()
    torch.cuda.set_stream(side)
    f.barrier()
    if ctx.role == "worker":
        push = [torch.full((LARGE,), 3.0, device="cuda")]
        pull = [torch.zeros(LARGE, device="cuda")]
        after = torch.empty(LARGE, device="cuda")  # allocated up front: see docs/gpu.md
        torch.mul(pull[0], 1, out=after)  # the kernel runs once first: CUDA's lazy loading would sync
        torch.cuda.synchronize()
        h = f.push_pull(push, [0], pull, [0])
        t0 = time.monotonic()
        sig.stream_wait_event(h)
        torch.mul(pull[0], 1, out=after)  # queued behind the wait on the current stream
        returned_in = time.monotonic() - t0
        sig.wait_event_done()
        torch.cuda.synchronize()
        assert returned_in < 0.2, returned_in  # the server sleeps 0.5 s: the CPU did not wait
        assert torch.all(after == 6.0), after[:4]
    else:
        sig.block_now_stream_and_get_batch()
        ((h, (t,), _),) = sig.get_future_batch_data()
        torch.cuda.current_stream().synchronize()  # the stream was released by the batch
        time.sleep(0.5)
        f.respond([t * 2], h, need_event=True)
    f.stop()
    return True


@pytest.mark.timeout(200)
def test_gpu_simple_notify_orders_the_stream_not_the_cpu():
    assert all(_mesh(_notify).values())


def _busy_stream(ctx: NodeContext) -> bool:
    """need_event: data still being written by the stream is sent only once written."""
    from stepmesh.backends import get

    cuda = get("cuda")
    f.init()
    if ctx.role == "worker":
        push = [torch.zeros(LARGE, device="cuda")]
        pull = [torch.zeros(LARGE, device="cuda")]
        f.barrier()
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued before the data is written
        push[0].fill_(5.0)
        h = f.push_pull(push, [0], pull, [0])  # need_event=True: returns at once, sends once the fill is done
        assert not torch.cuda.current_stream().query()
        f.wait(h)
        assert torch.all(pull[0] == 7.0), pull[0][:4]
    else:
        f.barrier()
        ((h, (t,), _),) = f.get_batch()
        assert torch.all(t == 5.0), t[:4]  # not the zeros that were there before the fill
        out = torch.zeros(LARGE, device="cuda")
        torch.cuda._sleep(200_000_000)
        out.fill_(7.0)
        event = cuda.record_event()
        assert event is not None and not event.query()
        cuda.release_event(event)
        f.respond([out], h, need_event=True)  # sent once the fill is done
    f.stop()
    return True


@pytest.mark.timeout(200)
def test_gpu_need_event_waits_for_a_busy_stream():
    assert all(_mesh(_busy_stream).values())


@pytest.mark.timeout(60)
def test_gpu_an_idle_stream_needs_no_event():
    from stepmesh.backends import get

    cuda = get("cuda")
    torch.cuda.synchronize()
    assert cuda.record_event(torch.device("cuda", 0)) is None  # nothing queued: the data is ready
    torch.cuda._sleep(50_000_000)
    event = cuda.record_event(torch.device("cuda", 0))
    assert event is not None and not event.query()
    event.synchronize()
    cuda.release_event(event)
