"""Hostile bytes: the decoders answer anything with an error, never a crash or a huge allocation.

The request decoder runs twice: Python's (``wire.decode_request``, which the
server uses for a layout it has not seen) and the compiled core's sizing of a
header (what it matches known layouts with); where Python accepts a header,
both agree on its size.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepmesh import ProtocolError
from stepmesh._core import core
from stepmesh.control import messages as P
from stepmesh.data import wire as W
from stepmesh.data.tensors import ITEMSIZE

SLOT = W.SLOT_SIZE
FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_request() -> bytes:
    buf = bytearray(SLOT)
    W.REQ_FIXED.pack_into(buf, 0, W.DATA_VERSION, 0, 1, 1, 1, 7)
    W.REQ_TENSOR.pack_into(buf, W.REQ_FIXED.size, 5, 0, 2, W.Placement.SEPARATE, 0, 64 * 4 * 4)
    pos = W.REQ_FIXED.size + W.REQ_TENSOR.size
    W.REQ_DIM.pack_into(buf, pos, 64)
    W.REQ_DIM.pack_into(buf, pos + 8, 4)
    W.REQ_PULL.pack_into(buf, pos + 16, 9, 1024, W.Placement.INLINE, 0)
    return bytes(buf)


def _decode_request(data: bytes) -> None:
    buf = bytes(data[:SLOT]) + bytes(max(0, SLOT - len(data)))
    size = core.header_size(buf)  # never crashes, whatever the bytes
    try:
        hdr = W.decode_request(buf, ITEMSIZE)
    except W.WireError:
        return
    # accepted: then it describes something bounded, and the core sizes it the same
    assert hdr.size <= W.HEADER_MAX and size == hdr.size
    assert len(hdr.tensors) <= W.MAX_TENSORS and len(hdr.pulls) <= W.MAX_PULLS
    assert all(m.nbytes <= W.MAX_TENSOR_BYTES for m in hdr.tensors)


@FUZZ
@given(st.binary(max_size=600))
def test_request_decoders_survive_random_bytes(data):
    _decode_request(data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=12))
def test_request_decoders_survive_mutations_of_a_valid_header(flips):
    data = bytearray(_valid_request()[:400])
    for pos, value in flips:
        data[pos] = value
    _decode_request(bytes(data))


def test_valid_request_decodes():
    hdr = W.decode_request(_valid_request(), ITEMSIZE)
    assert hdr.seq == 7 and hdr.tensors[0].shape == (64, 4)
    assert hdr.pulls == (W.PullMeta(9, 1024, W.Placement.INLINE, False),)
    assert core.header_size(_valid_request()) == hdr.size


def test_the_core_was_built_from_this_wire_format():
    W.check_core(core.constants())
    with pytest.raises(ImportError, match="DATA_VERSION"):
        W.check_core({**core.constants(), "DATA_VERSION": W.DATA_VERSION + 1})


def test_wire_py_run_as_a_script_writes_the_pxi_once(tmp_path):
    pxi = tmp_path / "wire.pxi"
    subprocess.run([sys.executable, W.__file__, str(pxi)], check=True, timeout=60)
    assert pxi.read_text() == W.cython_constants()
    assert not W.write_pxi(str(pxi))  # unchanged text is not rewritten (the build's timestamps stay)
    pxi.write_text("stale")
    assert W.write_pxi(str(pxi)) and pxi.read_text() == W.cython_constants()


@FUZZ
@given(st.binary(max_size=2000))
def test_control_decoder_survives_random_bytes(data):
    try:
        P.decode_control(data)
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(min_size=0, max_size=400), st.sampled_from(list(P.Msg)))
def test_control_decoder_survives_bytes_behind_a_valid_prefix(tail, kind):
    start = P._start(kind)
    try:
        P.decode_control(bytes(start.buf) + tail)
    except ProtocolError:
        pass


def test_oversized_control_message_is_refused_before_parsing():
    with pytest.raises(ProtocolError, match="exceeds"):
        P.decode_control(b"\0" * (P.MAX_CONTROL_BYTES + 1))


# ------------------------------------------------------------ packed tensors
def test_a_hidden_state_and_its_count_on_the_device_are_answered_packed():
    sep, inl, packed = W.Placement.SEPARATE, W.Placement.INLINE, W.Placement.PACKED
    hidden, count = 64 * 7168 * 2, 4
    assert W.pack_placements([hidden, count], [True, True], [sep, sep]) == [packed, packed]
    # one device tensor, host tensors, or only large ones: nothing to save
    assert W.pack_placements([hidden], [True], [sep]) == [sep]
    assert W.pack_placements([hidden, count], [False, False], [sep, inl]) == [sep, inl]
    assert W.pack_placements([hidden, hidden], [True, True], [sep, sep]) == [sep, sep]
    # a host tensor among them keeps its place; the device ones pack
    assert W.pack_placements([count, hidden, count], [False, True, True], [inl, sep, sep]) == [inl, packed, packed]
    assert W.pack_placements([W.PACK_MAX, count], [True, True], [sep, sep]) == [sep, sep]
    assert W.pack_offsets([hidden, count, 0, 1]) == [0, hidden, hidden + W.PACK_ALIGN, hidden + W.PACK_ALIGN,
                                                      hidden + 2 * W.PACK_ALIGN]


def test_only_device_answers_travel_packed():
    buf = bytearray(_valid_request())
    pull_at = W.REQ_FIXED.size + W.REQ_TENSOR.size + 16
    W.REQ_PULL.pack_into(buf, pull_at, 9, 1024, W.Placement.PACKED, 1)
    assert W.decode_request(bytes(buf), ITEMSIZE).pulls[0].placement is W.Placement.PACKED
    for what in ("host answer", "push"):
        bad = bytearray(buf)
        if what == "host answer":
            W.REQ_PULL.pack_into(bad, pull_at, 9, 1024, W.Placement.PACKED, 0)
        else:
            W.REQ_TENSOR.pack_into(bad, W.REQ_FIXED.size, 5, 0, 2, W.Placement.PACKED, 1, 64 * 4 * 4)
        with pytest.raises(W.WireError, match="placement"):
            W.decode_request(bytes(bad), ITEMSIZE)
    W.REQ_PULL.pack_into(buf, pull_at, 9, W.PACK_MAX + 1, W.Placement.PACKED, 1)  # more than the worker packs
    with pytest.raises(W.WireError, match="packed answers"):
        W.decode_request(bytes(buf), ITEMSIZE)


def test_only_small_device_tensors_travel_on_the_lane_and_only_to_a_server_with_one():
    sep, inl, lane = W.Placement.SEPARATE, W.Placement.INLINE, W.Placement.LANE
    hidden, count = 64 * 7168 * 2, 4
    assert W.lane_placements([hidden, count], [True, True], [sep, sep]) == [sep, lane]
    assert W.lane_placements([count, W.LANE_MAX + 1], [False, True], [inl, sep]) == [inl, sep]
    buf = bytearray(_valid_request())
    pull_at = W.REQ_FIXED.size + W.REQ_TENSOR.size + 16
    W.REQ_PULL.pack_into(buf, pull_at, 9, count, lane, 1)
    assert W.decode_request(bytes(buf), ITEMSIZE, lane=True).pulls[0].placement is lane
    with pytest.raises(W.WireError, match="no lane joins this server and the worker"):
        W.decode_request(bytes(buf), ITEMSIZE, lane=False)
    for cap, device in ((count, 0), (W.LANE_MAX + 1, 1), (0, 1)):  # a host answer, too large, empty
        W.REQ_PULL.pack_into(buf, pull_at, 9, cap, lane, device)
        with pytest.raises(W.WireError, match=f"only device answers of 1 to {W.LANE_MAX} bytes"):
            W.decode_request(bytes(buf), ITEMSIZE, lane=True)
    W.REQ_PULL.pack_into(buf, pull_at, 9, 1024, inl, 0)
    W.REQ_TENSOR.pack_into(buf, W.REQ_FIXED.size, 5, 0, 2, lane, 1, 64 * 4 * 4)  # a 1 KiB device push
    assert W.decode_request(bytes(buf), ITEMSIZE, lane=True).tensors[0].placement is lane
    with pytest.raises(W.WireError, match="no lane joins this server and the worker"):
        W.decode_request(bytes(buf), ITEMSIZE, lane=False)
