"""SimpleNotify off the GPU: a clear error at init(), never a crash or a hang."""

from __future__ import annotations

import pytest
import torch

import stepmesh as f


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the GPU test below covers it")
def test_without_cuda_init_passes_and_the_first_stream_wait_is_a_clear_config_error():
    sig = f.SimpleNotify()
    sig.init()  # StepMesh's connector makes one up front, also where it never waits on a stream
    with pytest.raises(f.ConfigError, match="CUDA"):
        sig.block_now_stream()


def test_calls_before_init_or_out_of_order_are_clear_errors():
    sig = f.SimpleNotify()
    with pytest.raises(f.StepMeshError, match="get_future_batch_data"):
        sig.get_future_batch_data()
    sig.wait_event_done()  # nothing pending: returns at once


# ----------------------------------------------------------------- on a GPU
from stepmesh.testing import NodeContext, run_mesh  # noqa: E402

from .conftest import mesh_env  # noqa: E402

LARGE = 300_000


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
        f.respond([t * 2], h)
    f.stop()
    return True


@pytest.mark.gpu
@pytest.mark.timeout(200)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; torch sees none here")
def test_simple_notify_orders_the_stream_not_the_cpu():
    results = run_mesh(_notify, env=mesh_env("cuda"), timeout=150)
    assert results.pop("scheduler") is None and all(results.values())
