"""Hostile bytes: the decoders answer anything with ProtocolError, never a crash or a huge allocation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepmesh import ProtocolError
from stepmesh import protocol as P
from stepmesh._tensors import ITEMSIZE

SLOT = P.HEADER_MAX + P.INLINE_MAX
FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _valid_request() -> bytes:
    buf = np.zeros(SLOT, dtype=np.uint8)
    P.REQ_FIXED.pack_into(buf, 0, P.DATA_VERSION, P.FLAG_INLINE, 1, 1, 1, 7)
    st_ = P.tensor_struct(2)
    st_.pack_into(buf, P.REQ_FIXED.size, 5, 0, 2, 64 * 4 * 4, 64, 4)
    P.REQ_PULL.pack_into(buf, P.REQ_FIXED.size + st_.size, 9, 1024)
    return bytes(buf)


def _decode_request(data: bytes) -> None:
    buf = np.zeros(SLOT, dtype=np.uint8)
    buf[: len(data)] = np.frombuffer(data[:SLOT], dtype=np.uint8)
    try:
        hdr = P.decode_request(buf, SLOT, ITEMSIZE)
    except ProtocolError:
        return
    # accepted: then it describes something bounded
    assert hdr.size <= P.HEADER_MAX
    assert len(hdr.tensors) <= P.MAX_TENSORS and len(hdr.pulls) <= P.MAX_PULLS
    assert all(m.nbytes <= P.MAX_TENSOR_BYTES for m in hdr.tensors)


@FUZZ
@given(st.binary(max_size=600))
def test_request_decoder_survives_random_bytes(data):
    _decode_request(data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=12))
def test_request_decoder_survives_mutations_of_a_valid_header(flips):
    data = bytearray(_valid_request()[:400])
    for pos, value in flips:
        data[pos] = value
    _decode_request(bytes(data))


def test_valid_request_decodes():
    hdr = P.decode_request(np.frombuffer(_valid_request(), dtype=np.uint8), SLOT, ITEMSIZE)
    assert hdr.seq == 7 and hdr.tensors[0].shape == (64, 4) and hdr.pulls == ((9, 1024),)


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
