"""The data worker's lane over real UCX: two transports of this process, each with its lane."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from stepmesh.config import PROGRESS_MODES
from stepmesh.control.transport import Transport
from stepmesh.data import wire as W

_SLICE_MS = 5000  # blocking mode: a message that did not wake the sleeper would take this long


def _pair(mode: str) -> tuple[Transport, Transport]:
    return (Transport(W.UCX_OPTIONS, mode, lane_options={**W.UCX_OPTIONS, **W.LANE_OPTIONS}),
            Transport(W.UCX_OPTIONS, mode, lane_options={**W.UCX_OPTIONS, **W.LANE_OPTIONS}))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", PROGRESS_MODES)
def test_a_message_on_the_lane_wakes_the_receiver_in_every_progress_mode(mode):
    a, b = _pair(mode)
    stop = threading.Event()
    try:
        assert a.has_lane and a.lane_address and a.lane_address != a.address
        ep = a.connect_lane(b.lane_address)
        src = np.arange(4096, dtype=np.uint32).view(np.uint8)
        dst = np.zeros_like(src)
        never = np.zeros(16, dtype=np.uint8)
        got = b.ucp.recv(dst.ctypes.data, dst.nbytes, 7, lane=True)
        on_data_worker = b.ucp.recv(never.ctypes.data, never.nbytes, 7)  # the same tag, on the other worker
        sent = a.ucp.send(ep.handle, src.ctypes.data, src.nbytes, 7)

        def sender() -> None:  # the lane's rendezvous needs the sender to progress too
            while not stop.is_set() and not sent.completed:
                a.progress_once(1)

        thread = threading.Thread(target=sender, daemon=True)
        t0 = time.monotonic()
        thread.start()
        assert b.progress_until(lambda: got.completed, time.monotonic() + 20, slice_ms=_SLICE_MS)
        took = time.monotonic() - t0
        thread.join(10)
        got.check_error()
        assert np.array_equal(dst, src)
        assert took < _SLICE_MS / 1000 / 2, f"the lane's message took {took:.2f} s: its event did not wake {mode}"
        assert not on_data_worker.completed  # a lane message never matches a receive of the data worker
        b.ucp.cancel(on_data_worker)
        assert b.progress_until(lambda: on_data_worker.completed, time.monotonic() + 5)
        assert on_data_worker.status != 0
        pending = b.ucp.recv(never.ctypes.data, never.nbytes, 9, lane=True)
        b.ucp.cancel(pending)  # cancelled on the lane, where it was posted
        assert b.progress_until(lambda: pending.completed, time.monotonic() + 5)
        assert pending.status != 0
        b.ucp.recv(never.ctypes.data, never.nbytes, 10, lane=True)  # left in flight: close() cancels it
        assert b.ucp.in_flight == 1
    finally:
        stop.set()
        b.close()
        a.close()
    assert b.ucp.in_flight == 0


@pytest.mark.timeout(30)
def test_a_transport_without_a_lane_says_so():
    t = Transport(W.UCX_OPTIONS, "polling")
    try:
        assert not t.has_lane and t.lane_address == b"" and not t.ucp.has_lane
        with pytest.raises(Exception, match="no lane"):
            t.connect_lane(b"x")
        with pytest.raises(Exception, match="no lane"):
            t.ucp.recv(0, 0, 1, lane=True)
    finally:
        t.close()
