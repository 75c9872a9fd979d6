"""The FFN side: take a batch from every worker, answer straight into their buffers.

For each worker a small ring of receive slots stays posted for request headers
(tag kind + sender, any sequence). A header that carries its payload inline is
copied out into the destination tensors; otherwise one receive per push tensor
is posted straight into the destination: a registered buffer's chunk when one
is registered for (worker, key), a fresh tensor otherwise.

Where the C extension is built, its ``ServerCore`` runs the rings, takes in
requests of known layouts and sends the common answers; this module decodes
new layouts, makes fresh tensors, and handles everything unusual. Without it
the same protocol runs here in Python.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from ctypes import memmove
from typing import Any

import numpy as np
import torch

from . import protocol as P
from ._tensors import (
    CODE_DTYPE,
    DTYPE_CODE,
    ITEMSIZE,
    BufferPool,
    HostBuffer,
    byte_view,
    check_keys,
    check_tensors,
)
from ._ucp import failure
from .errors import ArgumentError, PeerError, ProtocolError, StepMeshError, TimeoutError
from .node import Node

__all__ = ["AFTensorServer"]

log = logging.getLogger("stepmesh.server")

RING_DEPTH = 4
_LAYOUTS_KEEP = 16  # recent request layouts remembered per worker
_NATIVE_LAYOUTS = 256  # the C core's per worker (a direct-mapped table: dynamic token counts stay matched)
_SEQ = P.SEQ_STRUCT
_SLOT = P.HEADER_MAX + P.INLINE_MAX
_NONE: list[Any] = []  # a request with no payload messages (never appended to)
_now = time.monotonic_ns


class _Request:
    """A request from one worker, from its header until the server answers it."""

    __slots__ = ("handle", "layout", "reqs", "seq", "t_proc", "t_recv", "tensors", "worker")

    def __init__(self, worker: int, seq: int, tensors: list[torch.Tensor], layout: _Layout) -> None:
        self.worker = worker
        self.seq = seq
        self.tensors = tensors
        self.layout = layout  # its keys, and the answers asked of this server
        self.reqs: list[Any] = _NONE
        self.t_recv = 0
        self.t_proc = 0
        self.handle = 0


class _Layout:
    """A decoded request header, kept to recognise the next one laid out the same."""

    __slots__ = (
        "caps", "copies", "dest", "fresh", "gen", "hdr", "head", "keys", "large", "moves", "pulls", "push_inline",
        "push_tag", "resp_pos", "resp_struct", "separate", "size", "small", "small_idx", "tail", "takes",
    )

    def __init__(self, head: bytes, hdr: P.RequestHeader, tail: bytes, pulls: tuple, sender: int) -> None:
        self.head = head
        self.hdr = hdr
        self.tail = tail
        self.size = hdr.size
        self.keys = [m.key for m in hdr.tensors]
        self.pulls = pulls  # ((key, capacity), ...) asked of this server
        self.caps = [cap for _, cap in pulls]
        on_host = not hdr.flags & P.FLAG_DEVICE
        self.push_inline = P.inline_split([m.nbytes for m in hdr.tensors], on_host)
        self.small = P.inline_split(self.caps, on_host)  # which answers travel inside the response header
        self.small_idx = [j for j, fits in enumerate(self.small) if fits]
        self.large = [j for j, fits in enumerate(self.small) if not fits]
        self.resp_struct = P.response_struct(len(pulls))
        self.resp_pos = self.resp_struct.size
        self.push_tag = P.make_tag(P.TAG_PUSH, sender)  # the sequence is OR-ed in per request
        self.copies: list[tuple[int, int, int]] = []  # (tensor index, offset in the slot, bytes) of inline pushes
        self.separate: list[int] = []  # tensor indices that come as their own messages
        pos = hdr.size
        for i, (m, fits) in enumerate(zip(hdr.tensors, self.push_inline)):
            if not fits:
                self.separate.append(i)
            elif m.nbytes:
                self.copies.append((i, pos, m.nbytes))
                pos += m.nbytes
        self.dest: list[torch.Tensor | None] = []  # registered chunk views (None: unregistered), for ``gen``
        self.fresh: list[int] = []  # indices with no registered chunk: allocated per request
        self.moves: list[tuple[int, int, int]] = []  # inline pushes into host chunks: (address, offset in the slot, bytes)
        self.takes: list[tuple[int, int, int]] = []  # the other inline pushes: (tensor index, offset, bytes)
        self.gen = -1


class _Layouts(dict):
    """A worker's recent request layouts, by (header bytes before, after the sequence number).

    ``sizes`` lists the distinct header sizes among them, most recent first: a
    lookup slices the received header once per size.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def add(self, layout: _Layout) -> None:
        self[(layout.head, layout.tail)] = layout
        while len(self) > _LAYOUTS_KEEP:  # dicts keep insertion order: the oldest goes
            del self[next(iter(self))]
        self.sizes = list(dict.fromkeys([layout.size, *(known.size for known in reversed(self.values()))]))


class _Slot:
    """One posted receive for a request header (and its inline payload)."""

    __slots__ = ("buf", "req")

    def __init__(self) -> None:
        self.buf = HostBuffer(_SLOT)
        self.req: Any = None


class AFTensorServer(Node):
    """A server (FFN instance): ``get_batch`` from every worker, ``respond`` to each.

    Args:
        config: node configuration; from the environment when None.
    """

    role = "server"

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.workers: list[P.Peer] = []
        self.server_index = 0
        self._eps: list[int] = []  # ucp_ep_h of each worker's endpoint
        self._ops: Any = None
        self._rings: list[deque[_Slot]] = []
        self._arriving: list[_Request] = []
        self._ready: list[deque[_Request]] = []
        self._handles: dict[int, _Request] = {}
        self._next_handle = 1
        self._sends: list[tuple[Any, Any]] = []
        self._registered: dict[tuple[int, int], torch.Tensor] = {}
        self._reg_gen = 0  # bumped by register_recv_buffer: cached destinations are stale
        self._spare: list[tuple[int, _Slot]] = []  # used receive slots, to post again
        self._layouts: list[_Layouts] = []
        self._resp_tag = 0
        self._pull_tag = 0
        self._ring_tags: list[int] = []
        self._n_servers = 0
        self._resp_pool = BufferPool(P.response_header_size(P.MAX_PULLS) + P.INLINE_MAX)
        self._device = torch.device("cpu")
        self._deferred: list[tuple[Any, Any, _Request, list[torch.Tensor]]] = []  # (event, backend, request, answers)
        self._core: Any = None  # stepmesh._ucpc.ServerCore where the C extension is built
        self._slots: list[list[HostBuffer]] = []  # its receive slots' memory
        self._spins = 0

    def start(self) -> None:
        super().start()
        cfg = self.config
        self.workers = [p for p in self.peers if p.role is P.Role.WORKER]
        if cfg.backend in ("cuda", "rocm"):  # unregistered pushes land on this process's GPU
            self._device = torch.device("cuda", cfg.gpu)
        self.server_index = self.rank + (self.group * cfg.num_servers if cfg.topology == "full" else 0)
        self._eps = [self.endpoints[p.node_id].handle for p in self.workers]
        assert self.data is not None
        self._ops = self.data.ops
        self._ring_tags = [P.make_tag(P.TAG_REQUEST, p.node_id) for p in self.workers]
        self._resp_tag = P.make_tag(P.TAG_RESPONSE, self.node_id)
        self._pull_tag = P.make_tag(P.TAG_PULL, self.node_id)
        self._layouts = [_Layouts() for _ in self.workers]
        self._n_servers = cfg.num_servers * (cfg.group_size if cfg.topology == "full" else 1)
        self._ready = [deque() for _ in self.workers]
        self._rings = []
        native = self.data.native
        if native is not None:
            self._slots = [[HostBuffer(_SLOT) for _ in range(RING_DEPTH)] for _ in self.workers]
            self._core = native.ServerCore(
                self._ops, self._handles, list(self._eps), self._ring_tags,
                [P.make_tag(P.TAG_PUSH, p.node_id) for p in self.workers],
                [[slot.ptr for slot in ring] for ring in self._slots], _SLOT, P.TAG_MASK_KIND_NODE,
                self._resp_tag, self._pull_tag, P.DATA_VERSION, _NATIVE_LAYOUTS, self._resp_pool.size,
                self._native_layout, self._native_fill,
            )
            self.data.on_close(self._core.close)
            self._spins = self.data.core_spins
            return
        for w in range(len(self.workers)):
            ring: deque[_Slot] = deque()
            for _ in range(RING_DEPTH):
                slot = _Slot()
                self._post(w, slot)
                ring.append(slot)
            self._rings.append(ring)

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    def _post(self, w: int, slot: _Slot) -> None:
        slot.req = self._ops.recv(slot.buf.ptr, _SLOT, self._ring_tags[w], P.TAG_MASK_KIND_NODE)

    # ------------------------------------------------------------- receive
    def _pump(self) -> None:
        """Take in every header that arrived and every payload that completed.

        Used slots are reposted by the next get_batch (off the critical path),
        or here when a worker has none left posted.
        """
        if self._deferred:
            self._send_deferred()
        for w, ring in enumerate(self._rings):
            while ring and ring[0].req.completed:
                slot = ring.popleft()
                self._spare.append((w, slot))
                self._take(w, slot)
            if not ring:
                self._repost()
        if self._arriving:
            still = []
            for r in self._arriving:
                if all(q.completed for q in r.reqs):
                    for q in r.reqs:
                        q.check_error()
                    r.reqs = []
                    r.t_recv = time.monotonic_ns()
                    self._ready[r.worker].append(r)
                else:
                    still.append(r)
            self._arriving = still

    def _watched(self) -> list[Any]:
        """The receives whose completion would move a batch on: each worker's next header, each payload's next part."""
        watched = [ring[0].req for ring in self._rings if ring]
        for r in self._arriving:
            watched.extend(q for q in r.reqs if not q.completed)
        return watched

    def _repost(self) -> None:
        for w, slot in self._spare:
            self._post(w, slot)
            self._rings[w].append(slot)
        self._spare = []

    def _take(self, w: int, slot: _Slot) -> None:
        peer = self.workers[w]
        buf = slot.buf
        raw = buf.raw
        try:
            slot.req.check_error()
            # A header laid out like a recent one from this worker (only the
            # sequence differs) needs no decoding: StepMesh traffic repeats,
            # one layout per micro-batch stage. They are found by the header's
            # bytes around the sequence, sliced once per distinct header size.
            layouts = self._layouts[w]
            head = raw[: P.SEQ_OFFSET].tobytes()
            last = None
            for size in layouts.sizes:
                last = layouts.get((head, raw[P.SEQ_OFFSET + 4 : size].tobytes()))
                if last is not None:
                    break
            if last is not None:
                seq = _SEQ.unpack_from(raw, P.SEQ_OFFSET)[0]
            else:
                last = self._decode(w, raw)
                seq = last.hdr.seq
                layouts.add(last)
        except Exception as e:
            raise ProtocolError(f"bad request from {peer.describe()}: {e}") from e
        if last.gen != self._reg_gen:
            self._place(w, last)
        tensors = self._fresh(last)
        r = _Request(w, seq, tensors, last)
        if last.separate:  # first, so that UCX moves them while the inline ones are copied
            recv = self._ops.recv
            bits = last.push_tag | (seq << P.SEQ_SHIFT)
            r.reqs = [recv(tensors[i].data_ptr(), tensors[i].nbytes, bits | i) for i in last.separate]  # r.tensors keeps the memory alive
        base = buf.ptr
        for dst, pos, n in last.moves:
            memmove(dst, base + pos, n)
        for i, pos, n in last.takes:
            buf.take(pos, tensors[i], n)
        if last.separate:
            self._arriving.append(r)
        else:
            r.t_recv = _now()
            self._ready[w].append(r)

    def _decode(self, w: int, raw: np.ndarray) -> _Layout:
        """The layout of the request header in ``raw`` from worker ``w``, decoded and checked.

        Raises:
            ProtocolError: a malformed header, or one addressed to a mesh of another size.
        """
        hdr = P.decode_request(raw, _SLOT, ITEMSIZE)
        if hdr.n_servers != self._n_servers:
            raise ProtocolError(f"addressed {hdr.n_servers} servers, this mesh has {self._n_servers}")
        return _Layout(
            raw[: P.SEQ_OFFSET].tobytes(), hdr, raw[P.SEQ_OFFSET + 4 : hdr.size].tobytes(),
            hdr.pulls_for(self.server_index), self.workers[w].node_id,
        )

    def _place(self, w: int, lay: _Layout) -> None:
        """Where the pushes of ``lay`` land under the buffers registered now."""
        dest = lay.dest = [self._registered_view(w, m) for m in lay.hdr.tensors]
        lay.fresh = [i for i, v in enumerate(dest) if v is None]
        host = [i for i, _, _ in lay.copies if dest[i] is not None and not dest[i].is_cuda]
        lay.moves = [(dest[i].data_ptr(), pos, n) for i, pos, n in lay.copies if i in host]  # type: ignore[union-attr]
        lay.takes = [(i, pos, n) for i, pos, n in lay.copies if i not in host]
        lay.gen = self._reg_gen

    def _fresh(self, lay: _Layout) -> list[torch.Tensor]:
        """A request's push tensors: registered pushes land in their chunk's view, the others in memory of their own."""
        tensors = list(lay.dest)
        for i in lay.fresh:
            m = lay.hdr.tensors[i]
            tensors[i] = torch.empty(m.shape, dtype=CODE_DTYPE[m.dtype], device=self._device)
        return tensors

    def _native_layout(self, w: int, k: int, status: int) -> Any:
        """For the C core: slot ``k`` of worker ``w`` holds a header not seen lately (or failed with ``status``).

        Raises:
            ProtocolError: a malformed request, or one UCX could not receive (too large, say).
        """
        raw = self._slots[w][k].raw
        try:
            if status:
                raise failure(status)
            lay = self._decode(w, raw)
        except Exception as e:
            raise ProtocolError(f"bad request from {self.workers[w].describe()}: {e}") from e
        self._place(w, lay)
        hdr = lay.hdr
        dest = lay.dest
        sep = [(i, 0 if dest[i] is None else dest[i].data_ptr(), hdr.tensors[i].nbytes) for i in lay.separate]  # type: ignore[union-attr]
        fill = bool(lay.fresh or lay.takes)
        return self.data.native.Layout(  # type: ignore[union-attr]
            lay, raw[: hdr.size].tobytes(), lay.keys, list(dest), fill, sep, lay.moves, lay.caps,
            [int(f) for f in lay.small], lay.resp_pos,
        )

    def _native_fill(self, w: int, k: int, lay: _Layout) -> list[torch.Tensor]:
        """For the C core: a request's tensors where some need fresh memory or a copy the core does not make."""
        tensors = self._fresh(lay)
        slot = self._slots[w][k]
        for i, pos, n in lay.takes:
            slot.take(pos, tensors[i], n)
        return tensors

    def _registered_view(self, w: int, m: P.TensorMeta) -> torch.Tensor | None:
        """The registered chunk for (worker, key) viewed as ``m``, or None when there is none that fits."""
        chunk = self._registered.get((w, m.key))
        if chunk is None:
            return None
        dtype = CODE_DTYPE[m.dtype]
        if m.nbytes <= chunk.numel() and chunk.data_ptr() % ITEMSIZE[m.dtype] == 0:
            return chunk[: m.nbytes].view(dtype).view(m.shape)
        log.warning(
            "push of %d bytes of %s for key %d from worker %d does not fit its registered chunk "
            "(%d bytes at an offset of %d); allocating",
            m.nbytes, dtype, m.key, w, chunk.numel(), chunk.data_ptr() % 64,
        )
        return None

    # ------------------------------------------------------------ get_batch
    def get_batch(self, timeout_ms: int | None = None) -> list[tuple[int, list[torch.Tensor], list[int]]]:
        """One ``(handle, push_tensors, push_keys)`` per worker, in worker-rank order.

        Returns once every worker of the group has a request queued. With a
        timeout, returns ``[]`` when that does not happen in time; without one,
        waits as long as the workers are alive.

        Raises:
            PeerError: a worker of this group (or the scheduler) died.
            ProtocolError: a worker sent a malformed request.
        """
        data = self.data
        if data is None or self._stopped or not self.workers:
            raise StepMeshError("get_batch() on a server that is not running: call init() first")
        if timeout_ms is not None and (isinstance(timeout_ms, bool) or not isinstance(timeout_ms, (int, float)) or timeout_ms < 0):
            raise ArgumentError(f"timeout_ms must be None or a non-negative number, got {timeout_ms!r}")
        core = self._core
        if core is not None:
            if self._deferred:
                self._send_deferred()
            batch = core.get_batch(self._spins)
            return batch if batch is not None else self._native_batch(timeout_ms)
        if self._spare:
            self._repost()
        ready = self._ready

        def done() -> bool:
            self._pump()
            return all(ready)

        forever = timeout_ms is None
        deadline = time.monotonic() + (3600.0 if forever else timeout_ms / 1000)
        while not done():
            if self._deferred:  # answers wait for a CUDA event: look at it between progress steps
                arrived = data.progress_until(done, deadline, self._check_workers)
            else:  # spin until one of the receives it waits for completes
                arrived = data.wait_requests(self._watched(), deadline, self._check_workers, any=True)
            if not arrived and not done():
                if not forever:
                    return []
                deadline = time.monotonic() + 3600.0
        t_proc = time.monotonic_ns()
        batch = []
        for q in ready:
            r = q.popleft()
            r.t_proc = t_proc
            r.handle = self._next_handle
            self._next_handle += 1
            self._handles[r.handle] = r
            batch.append((r.handle, r.tensors, r.layout.keys))
        return batch

    def _native_batch(self, timeout_ms: int | None) -> list[tuple[int, list[torch.Tensor], list[int]]]:
        """get_batch with the C core, once not every worker had a request at once.

        Raises:
            PeerError: a worker of this group (or the scheduler) died.
            ProtocolError: a worker sent a malformed request.
        """
        data = self.data
        core = self._core
        assert data is not None
        forever = timeout_ms is None
        deadline = time.monotonic() + (3600.0 if forever else timeout_ms / 1000)  # type: ignore[operator]
        got: list[Any] = [None]

        def done() -> bool:
            if self._deferred:
                self._send_deferred()
            got[0] = core.get_batch(0)
            return got[0] is not None

        while True:
            self._check_workers()
            if self._spins and not self._deferred:  # the busy-poll runs inside the core
                batch = core.get_batch(self._spins)
                if batch is not None:
                    return batch
                if time.monotonic() < deadline:
                    continue
            elif data.progress_until(done, deadline, self._check_workers):
                return got[0]
            if not forever:
                return []
            deadline = time.monotonic() + 3600.0

    def _check_workers(self) -> None:
        self.check_alive()
        if self.dead:
            for peer in self.workers:
                if peer.node_id in self.dead:
                    raise PeerError(self.dead[peer.node_id], "worker", peer.rank)

    # -------------------------------------------------------------- respond
    def _validate(self, tensors: Any, handle: Any, name: str = "tensors") -> tuple[_Request, list[torch.Tensor]]:
        r = self._handles.get(handle) if isinstance(handle, int) else None
        if r is None:
            raise ArgumentError(f"handle {handle!r} is unknown: not from get_batch, or already answered")
        ts = check_tensors(name, tensors)
        pulls = r.layout.pulls
        if len(ts) != len(pulls):
            raise ArgumentError(
                f"{name} has {len(ts)} tensors but the worker asked this server for {len(pulls)} "
                f"(pull keys {[k for k, _ in pulls]})"
            )
        return r, ts

    def _too_big(self, r: _Request, ts: list[torch.Tensor], name: str) -> str | None:
        for j, (t, (key, cap)) in enumerate(zip(ts, r.layout.pulls)):
            nbytes = t.nbytes
            if nbytes > cap:
                return (
                    f"{name}[{j}] has {nbytes} bytes but the worker's pull tensor for key {key} "
                    f"holds only {cap}"
                )
        return None

    def respond(self, tensors: list[torch.Tensor], handle: int, need_event: bool = False) -> None:
        """Answer a request: ``tensors[j]`` lands in the worker's pull tensor for its j-th key.

        A tensor may be smaller than the worker's buffer (its first bytes are
        written), never larger: then the worker's ``wait`` fails with the reason
        and this raises.

        Raises:
            ArgumentError: unknown handle, wrong number of tensors, or a tensor that
                does not fit the worker's buffer (raised before any data is sent).
            PeerError: the worker died.
        """
        core = self._core
        if core is not None and need_event is False and self._fatal is None and not self.dead:
            if not core.respond(tensors, handle):  # sent; else nothing was, and the checks below say why
                return
        r = self._handles.get(handle) if isinstance(handle, int) else None
        # The common case, checked in one pass: a list of contiguous tensors of
        # known dtypes, one per pull, each fitting the worker's buffer.
        ok = r is not None and isinstance(tensors, list) and len(tensors) == len(r.layout.caps)
        if ok:
            for t, cap in zip(tensors, r.layout.caps):  # type: ignore[union-attr]
                if not (isinstance(t, torch.Tensor) and t.is_contiguous() and t.dtype in DTYPE_CODE and t.nbytes <= cap):
                    ok = False
                    break
        if ok:
            ts = tensors
        else:  # say exactly what is wrong
            r, ts = self._validate(tensors, handle)
            problem = self._too_big(r, ts, "tensors")
            if problem is not None:
                self._reject(r, problem)
                raise ArgumentError(problem)
        event, backend = self._event(ts) if need_event else (None, None)
        if event is None:
            self._send(r, ts)
        elif event.query():
            self._send(r, ts)
            backend.release_event(event)
        else:  # the stream is still producing the answer: send it from a later call, never block here
            del self._handles[r.handle]
            self._deferred.append((event, backend, r, list(ts)))

    @staticmethod
    def _event(ts: list[torch.Tensor]) -> tuple[Any, Any]:
        """An event on the current stream and its backend, when device answers are produced there."""
        for t in ts:
            if t.is_cuda:
                from .backends import select

                backend = select(None, t)
                return backend.record_event(t.device), backend
        return None, None

    def _send_deferred(self, block: bool = False) -> None:
        """Send the answers whose stream work has completed (all of them when ``block``)."""
        still = []
        error: PeerError | None = None
        for event, backend, r, ts in self._deferred:
            if block:
                backend.wait_event(event)
            if block or event.query():
                try:
                    self._send(r, ts)
                except PeerError as e:  # that worker is gone; the others still get their answers
                    error = error or e
                backend.release_event(event)
            else:
                still.append((event, backend, r, ts))
        self._deferred = still
        if error is not None:
            raise error

    def respond_vec(self, ret_buffer: torch.Tensor, tensors_vec: list[torch.Tensor], handles: list[int]) -> None:
        """Answer several requests from one buffer of rows laid back to back.

        Handle ``i`` receives the ``tensors_vec[i].shape[0]`` rows of ``ret_buffer``
        that follow those of handles ``0..i-1``. (StepMesh sent ``ret_buffer[:n_i]``
        to everyone, which is right only for one worker.)

        Raises:
            ArgumentError: mismatched lengths, too few rows, unknown handles or
                answers that do not fit (all checked before anything is sent).
        """
        (buf,) = check_tensors("ret_buffer", [ret_buffer])
        vec = check_tensors("tensors_vec", tensors_vec)
        if not isinstance(handles, (list, tuple)) or len(handles) != len(vec):
            raise ArgumentError(
                f"handles must be a list as long as tensors_vec ({len(vec)}), got {handles!r}"
            )
        ints = [h for h in handles if isinstance(h, int)]
        if len(set(ints)) != len(ints):
            raise ArgumentError(f"handles has duplicates: {list(handles)!r}; each request is answered once")
        rows = [t.shape[0] if t.dim() else 1 for t in vec]
        if buf.dim() == 0 or sum(rows) > buf.shape[0]:
            raise ArgumentError(
                f"ret_buffer has {buf.shape[0] if buf.dim() else 0} rows, tensors_vec asks for {sum(rows)}"
            )
        plans = []
        off = 0
        for i, (h, n) in enumerate(zip(handles, rows)):
            part = [buf[off : off + n]]
            r, ts = self._validate(part, h, f"ret_buffer rows for handles[{i}]")
            plans.append((r, ts, self._too_big(r, ts, f"ret_buffer rows for handles[{i}]")))
            off += n
        problems = [p for _, _, p in plans if p is not None]
        if problems:  # every worker learns why, none gets a partial answer
            for r, _, p in plans:
                self._reject(r, p or f"another answer of the same respond_vec was refused: {problems[0]}")
            raise ArgumentError(problems[0])
        for r, ts, _ in plans:
            self._send(r, ts)

    def _response(self, r: _Request, status: int, sizes: list[int], text: str = "") -> tuple[HostBuffer, int]:
        buf = self._resp_pool.get()
        raw = buf.raw
        now = time.monotonic_ns()
        st = P.response_struct(len(sizes))
        st.pack_into(raw, 0, P.DATA_VERSION, 0, status, len(sizes), r.seq, r.t_recv, r.t_proc, now, now, *sizes)
        pos = st.size
        if text:
            encoded = bytes(P.Writer().text(text[: P.MAX_STRING]).buf)
            raw[pos : pos + len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
            pos += len(encoded)
        return buf, pos

    def _send(self, r: _Request, ts: list[torch.Tensor]) -> None:
        if self._fatal is not None or self.dead:
            self._check_workers()  # raises before the handle is used up
        self._handles.pop(r.handle, None)  # a deferred answer's is gone already
        lay = r.layout
        sizes = [t.nbytes for t in ts]
        buf = self._resp_pool.get()
        now = _now()
        lay.resp_struct.pack_into(
            buf.raw, 0, P.DATA_VERSION, 0, P.STATUS_OK, len(sizes), r.seq, r.t_recv, r.t_proc, now, now, *sizes
        )
        pos = lay.resp_pos
        base = buf.ptr
        # Small answers are copied, not gathered by UCX from the tensors: a send
        # UCX cannot start at once would read them later, and the caller may
        # write its next answer into the same tensor as soon as respond returns.
        for j in lay.small_idx:
            n = sizes[j]
            if n:
                t = ts[j]
                if t.is_cuda:
                    buf.put(pos, t, n)
                else:
                    memmove(base + pos, t.data_ptr(), n)
                pos += n
        self._post_response(r, buf, pos, [(j, ts[j]) for j in lay.large])

    def _reject(self, r: _Request, text: str) -> None:
        """Tell the worker why it gets no answer, and complete its pull receives empty."""
        del self._handles[r.handle]
        lay = r.layout
        apart = P.scattered_answer(lay.caps, lay.small) >= 0
        buf, pos = self._response(r, P.STATUS_REJECTED, [0] * len(lay.caps), "" if apart else text)
        empty = [(j, torch.empty(0, dtype=torch.uint8)) for j in lay.large]
        self._post_response(r, buf, pos, empty)
        if apart:  # what follows the header would land in the worker's pull tensor
            note = torch.frombuffer(bytearray(P.Writer().text(text[: P.MAX_STRING]).buf), dtype=torch.uint8)
            tag = self._resp_tag | (r.seq << P.SEQ_SHIFT) | P.REFUSAL_SLOT
            self._sends.append((self._ops.send(self._eps[r.worker], note.data_ptr(), note.numel(), tag), note))

    def _post_response(self, r: _Request, buf: HostBuffer, length: int, payloads: Any) -> None:
        """Send the response header (then large answers); keep all alive until sent."""
        ep = self._eps[r.worker]
        send = self._ops.send
        bits = r.seq << P.SEQ_SHIFT
        sends = self._sends
        n_before = len(sends)
        req = send(ep, buf.ptr, length, self._resp_tag | bits)
        if req.completed:  # sent within the call (UCX copied it out): nothing to keep
            buf.release()
        else:
            sends.append((req, buf))
        if payloads:
            pull = self._pull_tag | bits
            for j, t in payloads:
                sends.append((send(ep, t.data_ptr(), t.nbytes, pull | j), t))
        if n_before:  # after the answer is on its way
            self._reap_sends()

    def flush(self, timeout_ms: int = 10000) -> None:
        """Wait until every answer sent so far has been delivered.

        UCX moves an answer while this process calls into stepmesh (get_batch,
        flush, stop); with some transports (CUDA IPC, TCP rendezvous) a large
        answer does not finish while the server computes or sleeps elsewhere.
        Call this before long work outside stepmesh.

        Raises:
            TimeoutError: not delivered within ``timeout_ms``.
            PeerError: a worker died.
        """
        data = self.data
        if data is None or self._stopped:
            raise StepMeshError("flush() on a server that is not running: call init() first")

        def done() -> bool:
            if self._deferred:
                self._send_deferred()
            self._reap_sends()
            in_core = self._core.reap() if self._core is not None else 0
            return not self._sends and not in_core and not self._deferred

        if not data.progress_until(done, time.monotonic() + timeout_ms / 1000, self._check_workers):
            in_core = self._core.reap() if self._core is not None else 0
            raise TimeoutError(f"{len(self._sends) + in_core} answer message(s) not delivered after {timeout_ms} ms")

    def _reap_sends(self) -> None:
        keep = []
        for req, owner in self._sends:
            if not req.completed:
                keep.append((req, owner))
            elif isinstance(owner, HostBuffer):
                owner.release()
        self._sends = keep

    # ------------------------------------------------------ registered memory
    def register_recv_buffer(self, tensor: torch.Tensor, worker_ranks: list[int], push_keys: list[int]) -> None:
        """Receive pushes of ``push_keys`` from ``worker_ranks`` straight into ``tensor``.

        The tensor is split evenly (by bytes) into one chunk per (worker, key),
        worker-major: chunk ``i * len(push_keys) + k`` takes key ``push_keys[k]``
        from worker ``worker_ranks[i]``. A push that fits its chunk lands there
        with no allocation; the tensors that ``get_batch`` returns are views of it.

        Raises:
            ArgumentError: not a contiguous tensor, unknown worker rank, or a size
                that does not split evenly.
        """
        (t,) = check_tensors("tensor", [tensor])
        if not isinstance(worker_ranks, (list, tuple)) or not worker_ranks:
            raise ArgumentError(f"worker_ranks must be a non-empty list of ranks, got {worker_ranks!r}")
        n_workers = len(self.workers) if self.workers else self.config.num_workers
        for i, w in enumerate(worker_ranks):
            if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w < n_workers:
                raise ArgumentError(f"worker_ranks[{i}] = {w!r} is not a worker rank 0..{n_workers - 1}")
        if not isinstance(push_keys, (list, tuple)) or not push_keys:
            raise ArgumentError(f"push_keys must be a non-empty list of int keys, got {push_keys!r}")
        keys = check_keys("push_keys", push_keys, len(push_keys), "push_keys")
        raw = byte_view(t)
        n = len(worker_ranks) * len(keys)
        if raw.numel() % n:
            raise ArgumentError(
                f"tensor has {raw.numel()} bytes, which do not split evenly into "
                f"{len(worker_ranks)} workers x {len(keys)} keys"
            )
        size = raw.numel() // n
        for i, w in enumerate(worker_ranks):
            for k, key in enumerate(keys):
                c = i * len(keys) + k
                self._registered[(w, key)] = raw[c * size : (c + 1) * size]
        self._reg_gen += 1
        if self._core is not None:  # its layouts point at the chunks registered before
            self._core.forget_layouts()

    def on_peer_dead(self, node_id: int, text: str) -> None:
        pass  # get_batch() and respond() consult self.dead

    def stop(self) -> None:
        """Send the answers still waiting for their stream, then the global stop barrier.

        Raises:
            TimeoutError: the other nodes did not all stop within ``stop_timeout_ms``.
        """
        if self._deferred and not self._stopped and self._fatal is None:
            self._send_deferred(block=True)
        super().stop()
