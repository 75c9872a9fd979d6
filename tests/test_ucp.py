"""Direct libucp tag operations (stepmesh._ucp) on a real UCX worker talking to itself."""

from __future__ import annotations

import time

import pytest
import torch

from stepmesh._ucp import IoVec, TagOps, UcpError, native_available
from stepmesh.transport import Transport

DEADLINE_S = 10.0


def test_the_c_tag_operations_are_built():
    Transport({}, "polling").close()  # loads ucxx, and with it libucp
    # CI installs with a compiler: a missing C extension there is a build problem,
    # not something to fall back from silently (users without one get ctypes).
    assert native_available(), "stepmesh._ucpc did not build or load: pip install -e . needs a C compiler"


@pytest.fixture(params=[True, False], ids=["c", "ctypes"])
def loop(request):
    """A polling transport with an endpoint to its own worker (UCX's self / shared-memory path),
    its tag operations in C and, again, through the ctypes fallback."""
    tp = Transport({}, "polling", native=request.param)
    ep = tp.connect(tp.address)
    assert isinstance(tp.ops, TagOps) != request.param
    try:
        yield tp, ep
    finally:
        tp.close()


def _wait(tp: Transport, *reqs) -> None:
    assert tp.progress_until(lambda: all(r.completed for r in reqs), time.monotonic() + DEADLINE_S)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("nbytes", [0, 8, 8192, 1 << 20])
def test_send_and_receive_move_the_bytes(loop, nbytes):
    tp, ep = loop
    ops = tp.ops
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    r = ops.recv(dst.data_ptr(), nbytes, 0x1234)
    s = ops.send(ep.handle, src.data_ptr(), nbytes, 0x1234)
    _wait(tp, r, s)
    r.check_error()
    s.check_error()
    assert torch.equal(dst, src)
    assert ops.in_flight == 0


@pytest.mark.timeout(30)
def test_the_mask_selects_which_tags_match(loop):
    tp, ep = loop
    ops = tp.ops
    a, b = torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)
    out = torch.zeros(1, dtype=torch.uint8)
    r = ops.recv(out.data_ptr(), 1, 0x2000, 0xF000)  # any tag 0x2xxx
    s1 = ops.send(ep.handle, a.data_ptr(), 1, 0x3001)  # no match: waits in UCX's unexpected queue
    s2 = ops.send(ep.handle, b.data_ptr(), 1, 0x2FFF)
    _wait(tp, r, s2)
    assert out.item() == 2
    late = torch.zeros(1, dtype=torch.uint8)
    r2 = ops.recv(late.data_ptr(), 1, 0x3001)
    _wait(tp, r2, s1)
    assert late.item() == 1


@pytest.mark.timeout(30)
def test_a_message_longer_than_the_receive_fails_that_receive(loop):
    tp, ep = loop
    ops = tp.ops
    src = torch.ones(64, dtype=torch.uint8)
    dst = torch.zeros(16, dtype=torch.uint8)
    r = ops.recv(dst.data_ptr(), 16, 7)
    s = ops.send(ep.handle, src.data_ptr(), 64, 7)
    _wait(tp, r, s)
    with pytest.raises(UcpError, match="(?i)truncated"):
        r.check_error()


@pytest.mark.timeout(30)
def test_close_cancels_what_is_still_posted(loop):
    tp, _ = loop
    ops = tp.ops
    dst = torch.zeros(16, dtype=torch.uint8)
    r = ops.recv(dst.data_ptr(), 16, 99)
    tp.progress_once()
    assert not r.completed and ops.in_flight == 1
    ops.close()
    assert r.completed and ops.in_flight == 0
    with pytest.raises(UcpError, match="(?i)cancel"):
        r.check_error()



@pytest.mark.timeout(30)
@pytest.mark.parametrize("sizes", [(24, 8192), (64, 4, 100), (16, 0, 40000)])
def test_gathered_pieces_arrive_as_one_message_scattered_in_order(loop, sizes):
    tp, ep = loop
    ops = tp.ops
    srcs = [torch.randint(0, 255, (n,), dtype=torch.uint8) for n in sizes]
    whole = torch.zeros(sum(sizes), dtype=torch.uint8)
    r = ops.recv(whole.data_ptr(), whole.numel(), 0x51)
    s = ops.send_iov(ep.handle, IoVec([(t.data_ptr(), t.numel()) for t in srcs]), 0x51)
    _wait(tp, r, s)
    r.check_error()
    assert torch.equal(whole, torch.cat(srcs))
    # and back: one contiguous message scattered over pieces of the same sizes
    dsts = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
    r = ops.recv_iov(IoVec([(t.data_ptr(), t.numel()) for t in dsts]), 0x52)
    s = ops.send(ep.handle, whole.data_ptr(), whole.numel(), 0x52)
    _wait(tp, r, s)
    r.check_error()
    assert all(torch.equal(d, t) for d, t in zip(dsts, srcs))


@pytest.mark.timeout(30)
def test_a_short_message_fills_the_first_pieces_only(loop):
    tp, ep = loop
    ops = tp.ops
    head, body, tail = (torch.full((n,), 9, dtype=torch.uint8) for n in (8, 16, 32))
    iov = IoVec([(head.data_ptr(), 8), (body.data_ptr(), 16), (tail.data_ptr(), 32)])
    src = torch.arange(12, dtype=torch.uint8)
    r = ops.recv_iov(iov, 0x53)
    s = ops.send(ep.handle, src.data_ptr(), 12, 0x53)
    _wait(tp, r, s)
    r.check_error()
    assert head.tolist() == list(range(8))
    assert body.tolist() == [8, 9, 10, 11] + [9] * 12
    assert tail.tolist() == [9] * 32


@pytest.mark.timeout(30)
def test_cancel_completes_a_posted_receive_as_cancelled(loop):
    tp, _ = loop
    ops = tp.ops
    dst = torch.zeros(8, dtype=torch.uint8)
    r = ops.recv(dst.data_ptr(), 8, 0x77)
    assert not r.completed
    ops.cancel(r)
    _wait(tp, r)
    with pytest.raises(UcpError, match="(?i)cancel"):
        r.check_error()
    assert ops.in_flight == 0
    ops.cancel(r)  # a completed one: nothing to do


@pytest.mark.timeout(30)
def test_a_request_dropped_in_flight_is_still_completed_and_released(loop):
    tp, ep = loop
    ops = tp.ops
    dst = torch.zeros(8, dtype=torch.uint8)
    ops.recv(dst.data_ptr(), 8, 0x81)  # the caller keeps no reference
    assert ops.in_flight == 1
    src = torch.arange(8, dtype=torch.uint8)
    s = ops.send(ep.handle, src.data_ptr(), 8, 0x81)
    _wait(tp, s)
    assert tp.progress_until(lambda: torch.equal(dst, src), time.monotonic() + DEADLINE_S)
    ops.close()  # what was never seen complete is released here
    assert ops.in_flight == 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("args", [(-1, 8, 1), (0, "8", 1), (0, 8, 2**64)])
def test_the_c_calls_refuse_what_is_not_an_address_a_size_or_a_tag(args):
    # (ctypes masks such values into range: its callers, stepmesh's own, never pass them)
    tp = Transport({}, "polling", native=True)
    try:
        with pytest.raises(TypeError, match="ptr|nbytes|tag"):
            tp.ops.recv(*args)
        assert tp.ops.in_flight == 0
    finally:
        tp.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("native", [True, False], ids=["c", "ctypes"])
def test_a_ucx_progress_thread_may_run_beside_the_calls(native):
    tp = Transport({}, "thread", native=native)
    try:
        ep = tp.connect(tp.address)
        ops = tp.ops
        src = torch.randint(0, 255, (1 << 16,), dtype=torch.uint8)
        for i in range(50):
            dst = torch.zeros_like(src)
            r = ops.recv(dst.data_ptr(), dst.numel(), 0x900 + i)
            s = ops.send(ep.handle, src.data_ptr(), src.numel(), 0x900 + i)
            _wait(tp, r, s)
            r.check_error()
            assert torch.equal(dst, src)
        assert ops.in_flight == 0
    finally:
        tp.close()


@pytest.mark.timeout(30)
def test_wait_spins_until_all_or_any_and_stamps_each_completion(loop):
    tp, ep = loop
    ops = tp.ops
    a, b = torch.zeros(4, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8)
    ra, rb = ops.recv(a.data_ptr(), 4, 0xA1), ops.recv(b.data_ptr(), 4, 0xA2)
    assert not ops.wait([ra, rb], 100) and not ops.wait([ra, rb], 0, True)  # nothing sent: not done
    src = torch.arange(4, dtype=torch.uint8)
    before = time.monotonic_ns()
    s1 = ops.send(ep.handle, src.data_ptr(), 4, 0xA2)
    assert ops.wait([ra, rb], 10_000, True)  # one of them
    assert rb.completed and not ra.completed and before <= rb.t_done <= time.monotonic_ns()
    assert not ops.wait([ra, rb], 100)
    s2 = ops.send(ep.handle, src.data_ptr(), 4, 0xA1)
    assert ops.wait([ra, rb, s1, s2], 10_000)
    assert ra.t_done >= rb.t_done and torch.equal(a, src) and torch.equal(b, src)
    assert ops.wait([], 0) and ops.wait([], 0, True)
    with pytest.raises((TypeError, AttributeError)):  # (C: TypeError; ctypes: no .completed)
        ops.wait([ra, "not a request"], 1)


def test_an_uninitialised_c_tagops_refuses_instead_of_crashing():
    Transport({}, "polling").close()  # loads ucxx and binds the C module
    from stepmesh import _ucpc

    ops = _ucpc.TagOps.__new__(_ucpc.TagOps)
    with pytest.raises(RuntimeError, match="not initialised"):
        ops.progress()
    with pytest.raises(RuntimeError, match="not initialised"):
        ops.recv(0, 0, 1)
    ops.close()
