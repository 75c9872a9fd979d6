"""The C cores (stepmesh._ucpc WorkerCore / ServerCore) on a real UCX worker talking to itself.

The data-plane tests drive them through the public API between processes;
these hand them messages directly, to pin down what each checks and sends.
"""

from __future__ import annotations

import gc
import time
import weakref

import pytest
import torch

from stepmesh import protocol as P
from stepmesh._tensors import DTYPE_CODE
from stepmesh._ucp import native_module
from stepmesh.transport import Transport

DEADLINE_S = 10.0
REQ_TAG = P.make_tag(P.TAG_REQUEST, 1)
RESP_TAG = P.make_tag(P.TAG_RESPONSE, 2)
PULL_TAG = P.make_tag(P.TAG_PULL, 2)
DONE, PENDING, UNKNOWN, BAD_TIMEOUT, FAILED = range(5)


@pytest.fixture
def loop():
    tp = Transport({}, "polling")
    ep = tp.connect(tp.address)
    mod = native_module(tp.ops)
    assert mod is not None, "stepmesh._ucpc was not built with its cores: pip install -e . needs a C compiler"
    try:
        yield tp, ep, mod
    finally:
        tp.close()


def _until(tp: Transport, done) -> None:
    assert tp.progress_until(done, time.monotonic() + DEADLINE_S)


def _worker_plan(mod, ep, out: torch.Tensor):
    """No pushes, one pull answered inline (copied into ``out``)."""
    resp_pos = P.response_struct(1).size
    parts = [(P.response_header_size(1) + out.nbytes, RESP_TAG, None, [], [(0, out.data_ptr(), out.nbytes)])]
    template = bytearray(P.request_header_size([], 1))
    P.REQ_FIXED.pack_into(template, 0, P.DATA_VERSION, P.FLAG_INLINE, 0, 1, 1, 0)
    return mod.Plan(object(), [ep.handle], REQ_TAG, bytes(template), [], [], parts, 1, resp_pos, None)


def _assert_unclaimed(tp, ep, tag: int) -> None:
    """A message with ``tag`` reaches a receive posted now: none posted earlier is still waiting for it."""
    dst = torch.zeros(8, dtype=torch.uint8)
    mine = tp.ops.recv(dst.data_ptr(), 8, tag)
    src = torch.full((8,), 5, dtype=torch.uint8)
    s = tp.ops.send(ep.handle, src.data_ptr(), 8, tag)
    _until(tp, lambda: mine.completed and s.completed)
    assert dst.tolist() == [5] * 8


def _answer(tp, ep, seq: int, body: bytes, version: int = P.DATA_VERSION, status: int = 0, size: int | None = None):
    head = P.response_struct(1).pack(version, 0, status, 1, seq, 11, 22, 33, 44, len(body) if size is None else size)
    msg = torch.frombuffer(bytearray(head + body), dtype=torch.uint8)
    s = tp.ops.send(ep.handle, msg.data_ptr(), msg.numel(), RESP_TAG | (seq << P.SEQ_SHIFT))
    _until(tp, lambda: s.completed)


@pytest.mark.timeout(30)
def test_a_worker_core_copies_good_answers_out_and_hands_bad_ones_back(loop):
    tp, ep, mod = loop
    out = torch.zeros(16, dtype=torch.uint8)
    core = mod.WorkerCore(tp.ops, {}, 1, P.DATA_VERSION, 8, 16)
    plan = _worker_plan(mod, ep, out)
    request = torch.zeros(64, dtype=torch.uint8)

    def call() -> tuple[int, int]:
        got = tp.ops.recv(request.data_ptr(), 64, REQ_TAG, P.TAG_MASK_KIND_NODE)
        h = core.push_pull(plan, [], [out], True)
        _until(tp, lambda: got.completed)
        seq = int.from_bytes(request[P.SEQ_OFFSET : P.SEQ_OFFSET + 4].numpy().tobytes(), "little")
        return h, seq

    h, seq = call()
    assert core.wait(h, 1000, 0) == PENDING
    assert core.waiting(h) == [0]
    _answer(tp, ep, seq, bytes(range(16)))
    assert core.wait(h, 1000, 100_000) == DONE
    assert out.tolist() == list(range(16))
    (trace,) = core.trace(h)
    assert trace[2:6] == [11, 22, 33, 44] and trace[0] <= trace[1] <= trace[6] <= trace[7]
    assert core.wait(h, 1000, 0) == UNKNOWN  # waited for already

    for problem, kwargs in ((1, {"version": 99}), (1, {"status": P.STATUS_REJECTED}), (2, {"size": 17})):
        out.zero_()
        h, seq = call()
        _answer(tp, ep, seq, bytes(16), **kwargs)
        assert core.wait(h, 1000, 100_000) == FAILED
        failed = core.take_failed()
        assert failed.problems() == [problem] and failed.seq == seq and failed.ucx_status() == 0
        assert len(failed.response(0)) == P.response_header_size(1) + 16
        failed.release()
        failed.release()  # idempotent
        assert out.tolist() == [0] * 16  # a bad answer is not copied out
        assert core.take_failed() is None

    assert core.wait(h, "soon", 0) == BAD_TIMEOUT
    assert all(core.push_pull(plan, [], [out], True) is not None for _ in range(8))
    assert core.push_pull(plan, [], [out], True) is None  # max_in_flight is 8
    core.close()  # cancels every receive still posted
    assert core.pending == {} and tp.ops.in_flight == 0


def test_the_cores_refuse_what_does_not_describe_a_mesh(loop):
    tp, ep, mod = loop
    with pytest.raises(ValueError):
        mod.WorkerCore(tp.ops, {}, 0, P.DATA_VERSION, 8, 16)
    with pytest.raises(TypeError):
        mod.WorkerCore(object(), {}, 1, P.DATA_VERSION, 8, 16)
    out = torch.zeros(4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="one part per endpoint"):
        mod.Plan(None, [ep.handle, ep.handle], REQ_TAG, bytes(28), [], [], [(100, RESP_TAG, None, [], [])], 1, 50, None)
    with pytest.raises(ValueError, match="shorter than its fixed part"):
        mod.Plan(None, [ep.handle], REQ_TAG, bytes(4), [], [], [(100, RESP_TAG, None, [], [])], 1, 50, None)
    with pytest.raises(ValueError, match="beyond the answers"):
        mod.Plan(None, [ep.handle], REQ_TAG, bytes(28), [], [], [(100, RESP_TAG, None, [], [(3, out.data_ptr(), 4)])], 1, 50, None)
    header = bytearray(P.request_header_size([(4,)], 1))
    P.REQ_FIXED.pack_into(header, 0, P.DATA_VERSION, P.FLAG_INLINE, 1, 1, 1, 0)
    P.tensor_struct(1).pack_into(header, P.REQ_FIXED.size, 0, DTYPE_CODE[torch.uint8], 1, 4, 4)
    with pytest.raises(ValueError, match="needs fill"):
        mod.Layout(None, bytes(header), [0], [None], False, [], [], [4], [1], 50)
    with pytest.raises(ValueError, match="one small flag per answer"):
        mod.Layout(None, bytes(header), [0], [out], False, [], [], [4], [], 50)
    with pytest.raises(ValueError, match="one whole request header"):
        mod.Layout(None, bytes(header) + b"x", [0], [out], False, [], [], [4], [1], 50)


@pytest.mark.timeout(30)
def test_a_server_core_takes_in_a_known_layout_and_answers_it(loop):
    tp, ep, mod = loop
    chunk = torch.zeros(8, dtype=torch.uint8)  # the registered destination of the one push
    slot = torch.zeros(P.HEADER_MAX + P.INLINE_MAX, dtype=torch.uint8)
    header = bytearray(P.request_header_size([(8,)], 1))
    P.REQ_FIXED.pack_into(header, 0, P.DATA_VERSION, P.FLAG_INLINE, 1, 1, 1, 0)
    P.tensor_struct(1).pack_into(header, P.REQ_FIXED.size, 5, DTYPE_CODE[torch.uint8], 1, 8, 8)
    P.REQ_PULL.pack_into(header, P.REQ_FIXED.size + P.tensor_struct(1).size, 6, 8)
    resp_pos = P.response_struct(1).size
    asked = []

    def new_layout(w: int, k: int, status: int):
        asked.append((w, k, status))
        moves = [(chunk.data_ptr(), len(header), 8)]  # the inline push, copied into its chunk
        return mod.Layout("layout", bytes(header), [5], [chunk], False, [], moves, [8], [1], resp_pos)

    def fill(w: int, k: int, lay):
        raise AssertionError("a layout without fill never asks for tensors")

    handles: dict = {}
    core = mod.ServerCore(
        tp.ops, handles, [ep.handle], [REQ_TAG], [P.make_tag(P.TAG_PUSH, 1)], [[slot.data_ptr()]], slot.numel(),
        P.TAG_MASK_KIND_NODE, RESP_TAG, PULL_TAG, P.DATA_VERSION, 4, P.response_header_size(P.MAX_PULLS) + P.INLINE_MAX,
        new_layout, fill,
    )
    answer = torch.zeros(128, dtype=torch.uint8)
    for seq in (7, 8):
        P.SEQ_STRUCT.pack_into(header, P.SEQ_OFFSET, seq)
        msg = torch.frombuffer(bytearray(bytes(header) + bytes([seq] * 8)), dtype=torch.uint8)
        s = tp.ops.send(ep.handle, msg.data_ptr(), msg.numel(), REQ_TAG | (seq << P.SEQ_SHIFT))
        batch = None

        def got_batch() -> bool:
            nonlocal batch
            batch = core.get_batch(64)
            return batch is not None

        _until(tp, lambda s=s: s.completed and got_batch())
        ((h, tensors, keys),) = batch
        assert keys == [5] and tensors[0] is chunk and chunk.tolist() == [seq] * 8
        assert handles[h].seq == seq and handles[h].worker == 0 and handles[h].layout == "layout"
        r = tp.ops.recv(answer.data_ptr(), answer.numel(), RESP_TAG | (seq << P.SEQ_SHIFT))
        assert core.respond([chunk[:3], chunk], h) == 2  # one answer too many: for Python to word
        assert core.respond([torch.zeros(9, dtype=torch.uint8)], h) == 2  # longer than the worker's buffer
        assert core.respond([chunk + 1], h) == 0
        assert h not in handles
        assert core.respond([chunk], h) == 1  # answered already
        _until(tp, lambda r=r: r.completed)
        f = P.response_struct(1).unpack_from(answer.numpy(), 0)
        assert (f[0], f[2], f[3], f[4], f[9]) == (P.DATA_VERSION, P.STATUS_OK, 1, seq, 8)
        assert answer[resp_pos : resp_pos + 8].tolist() == [seq + 1] * 8
    assert asked == [(0, 0, 0)]  # decoded once, matched the second time
    assert core.reap() == 0
    core.close()


@pytest.mark.timeout(30)
def test_a_call_in_flight_cannot_be_released_and_may_be_dropped(loop):
    tp, ep, mod = loop
    core = mod.WorkerCore(tp.ops, {}, 1, P.DATA_VERSION, 8, 16)
    plan = _worker_plan(mod, ep, torch.zeros(16, dtype=torch.uint8))
    h = core.push_pull(plan, [], [torch.zeros(16, dtype=torch.uint8)], True)
    with pytest.raises(RuntimeError, match="in flight"):
        core.pending[h].release()
    del core.pending[h]  # its operations are cancelled, its memory left to UCX
    assert core.wait(h, 1000, 0) == UNKNOWN
    _assert_unclaimed(tp, ep, RESP_TAG | (1 << P.SEQ_SHIFT))  # its response receive (seq 1) is gone


@pytest.mark.timeout(30)
def test_an_answer_lands_in_a_pull_tensor_only_the_call_holds(loop):
    """The call keeps its pull tensors until the inline answers are copied in (run under ASan once to see it)."""
    tp, ep, mod = loop
    core = mod.WorkerCore(tp.ops, {}, 1, P.DATA_VERSION, 8, 16)
    out = torch.zeros(16, dtype=torch.uint8)
    plan = _worker_plan(mod, ep, out)
    request = torch.zeros(64, dtype=torch.uint8)
    got = tp.ops.recv(request.data_ptr(), 64, REQ_TAG, P.TAG_MASK_KIND_NODE)
    pulls = [out]
    ref = weakref.ref(out)
    h = core.push_pull(plan, [], pulls, True)
    del out, pulls
    assert ref() is not None  # the call holds it
    _until(tp, lambda: got.completed)
    seq = int.from_bytes(request[P.SEQ_OFFSET : P.SEQ_OFFSET + 4].numpy().tobytes(), "little")
    _answer(tp, ep, seq, bytes(range(16)))
    assert core.wait(h, 1000, 100_000) == DONE
    assert ref() is None  # and lets it go once the answer is in


def test_cores_that_were_never_initialised_refuse_instead_of_crashing(loop):
    tp, ep, mod = loop
    worker = mod.WorkerCore.__new__(mod.WorkerCore)
    server = mod.ServerCore.__new__(mod.ServerCore)
    for call in (lambda: worker.wait(1, 1, 0), lambda: worker.trace(1), lambda: worker.pending,
                 lambda: worker.call([], [], [], [], True), lambda: server.get_batch(0),
                 lambda: server.respond([], 1), lambda: server.handles, lambda: server.reap()):
        with pytest.raises(RuntimeError, match="not initialised"):
            call()


def test_a_server_core_does_not_keep_its_server_alive(loop):
    """The core calls back into bound methods of its server: the cycle must be collectable."""
    tp, ep, mod = loop

    class Owner:
        def new_layout(self, w, k, status):
            raise AssertionError

        def fill(self, w, k, lay):
            raise AssertionError

    owner = Owner()
    slot = torch.zeros(P.HEADER_MAX + P.INLINE_MAX, dtype=torch.uint8)
    owner.core = mod.ServerCore(
        tp.ops, {}, [ep.handle], [REQ_TAG], [P.make_tag(P.TAG_PUSH, 1)], [[slot.data_ptr()]], slot.numel(),
        P.TAG_MASK_KIND_NODE, RESP_TAG, PULL_TAG, P.DATA_VERSION, 4, 1 << 16, owner.new_layout, owner.fill,
    )
    ref = weakref.ref(owner)
    del owner
    gc.collect()
    assert ref() is None
    _assert_unclaimed(tp, ep, REQ_TAG)  # the collected core cancelled its posted receive
