"""Direct libucp tag operations (stepmesh._ucp) on a real UCX worker talking to itself."""

from __future__ import annotations

import time

import pytest
import torch

from stepmesh._ucp import IoVec, UcpError
from stepmesh.transport import Transport

DEADLINE_S = 10.0


@pytest.fixture
def loop():
    """A polling transport with an endpoint to its own worker (UCX's self / shared-memory path)."""
    tp = Transport({}, "polling")
    ep = tp.connect(tp.address)
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
