"""The attention side: push hidden states to every server, pull the answers back.

One ``push_pull`` is, per server: one request message (header, plus the payload
when it is small) and, for large payloads, one tag message per push tensor
received by the server straight into its destination. Before anything is sent,
the receives for the answers are posted: the response header (with the payload
when small) and, for large answers, one receive per pull tensor, so the server's
data lands directly in the caller's tensors.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from ctypes import memmove
from typing import Any

import numpy as np
import torch

from . import protocol as P
from ._tensors import (
    DTYPE_CODE,
    BufferPool,
    HostBuffer,
    as_buffer,
    check_keys,
    check_tensors,
    memory_buffer,
)
from .errors import ArgumentError, PeerError, ProtocolError, StepMeshError, TimeoutError
from .node import Node

__all__ = ["AFTensorWorker"]

_TRACE_KEEP = 4096
_PLANS_KEEP = 256
_SEQ = struct.Struct("<I")


class _Plan:
    """What a push_pull signature (buffers, shapes, dtypes, keys) needs, built once."""

    __slots__ = (
        "copies", "event", "hlen", "inline", "length", "n_servers", "per", "pulls", "push_sends",
        "recvs", "req_tag", "small", "template",
    )


class _Pending:
    """One push_pull in flight: its UCX requests and every buffer they use."""

    __slots__ = (
        "handle", "seq", "reqs", "keep", "hbuf", "resp", "pulls", "per_server", "inline", "bounds", "t_start", "t_sent",
        "sends", "event",
    )

    def __init__(self, handle: int, seq: int, per_server: int) -> None:
        self.handle = handle
        self.seq = seq
        self.per_server = per_server
        self.reqs: list[Any] = []
        self.keep: list[Any] = []
        self.hbuf: HostBuffer | None = None
        self.resp: list[HostBuffer] = []
        self.pulls: list[torch.Tensor] = []
        self.inline: list[bool] = []
        self.bounds: list[tuple[int, int]] = []  # reqs[a:b] are server s's receives
        self.sends: list[tuple[Any, Any]] | None = None  # (buffer, tag) to post to every server
        self.event: Any = None  # CUDA event the sends wait for
        self.t_start = 0
        self.t_sent = 0


class AFTensorWorker(Node):
    """A worker (attention instance): ``push_pull`` / ``wait`` against every server of its group.

    Args:
        config: node configuration; from the environment when None.
    """

    role = "worker"

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._seq = 0
        self._next_handle = 1
        self._pending: dict[int, _Pending] = {}
        self._traces: OrderedDict[int, list[list[int]]] = OrderedDict()
        self._req_pool = BufferPool(P.HEADER_MAX + P.INLINE_MAX)
        self._resp_pools: dict[int, BufferPool] = {}
        self.servers: list[P.Peer] = []
        self._server_eps: list[Any] = []
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()
        self._deferred: list[_Pending] = []
        self._Tag: Any = None

    def start(self) -> None:
        super().start()
        self._address_servers()
        assert self.data is not None
        self._Tag = self.data.api.UCXXTag

    @property
    def num_servers(self) -> int:
        return len(self.servers)

    # ----------------------------------------------------------- push_pull
    def push_pull(
        self,
        push_tensors: list[torch.Tensor],
        push_keys: list[int],
        pull_tensors: list[torch.Tensor],
        pull_keys: list[int],
        need_event: bool = True,
    ) -> int:
        """Send every push tensor to every server; their answers land in ``pull_tensors``.

        ``len(pull_tensors)`` must be ``num_servers * P``: ``pull_tensors[s*P + j]``
        receives server ``s``'s answer for ``pull_keys[s*P + j]``. Returns at once
        with a handle for :meth:`wait`; the tensors must not be touched until then.

        Raises:
            ArgumentError: bad input, raised before anything is sent (names the argument).
            PeerError: a server of this group is dead.
            StepMeshError: not initialised or already stopped.
        """
        data = self.data
        if data is None or self._stopped or not self.servers:
            raise StepMeshError("push_pull() on a worker that is not running: call init() first")
        if self._fatal is not None or self.dead:
            self._check_servers()  # a server that rejoined is reconnected here
        if self._deferred:
            self._send_deferred()
        # StepMesh traffic repeats the same buffers, shapes and keys every layer:
        # everything that depends only on those is built once per signature.
        try:
            sig = (
                tuple(push_keys),
                tuple(pull_keys),
                need_event,
                *[(t.data_ptr(), t.shape, t.dtype, t.is_contiguous(), t.device) for t in push_tensors],
                None,
                *[(t.data_ptr(), t.shape, t.dtype, t.is_contiguous(), t.device) for t in pull_tensors],
            )
            plan = self._plans.get(sig)
        except (TypeError, AttributeError):  # not lists of tensors: the slow path names the problem
            sig, plan = None, None
        if plan is None:
            plan = self._plan(push_tensors, push_keys, pull_tensors, pull_keys, need_event)
            if sig is not None:
                self._plans[sig] = plan
                if len(self._plans) > _PLANS_KEEP:
                    self._plans.popitem(last=False)
        if len(self._pending) >= P.MAX_IN_FLIGHT:
            raise ArgumentError(
                f"push_pull: {len(self._pending)} calls are already in flight (the limit is {P.MAX_IN_FLIGHT}); "
                "wait() for some first"
            )
        event = plan.event() if plan.event is not None else None
        t_start = time.monotonic_ns()
        seq = self._seq = (self._seq + 1) & P.SEQ_MASK
        bits = seq << P.SEQ_SHIFT
        handle = self._next_handle
        self._next_handle += plan.n_servers + 1
        pend = _Pending(handle, seq, plan.per)
        pend.t_start = t_start
        pend.pulls = plan.pulls
        pend.keep = push_tensors  # alive until complete
        reqs = pend.reqs
        bounds = pend.bounds
        resp = pend.resp
        Tag = self._Tag

        # 1. post every receive for the answers before anything is sent
        for ep, pool, resp_tag, pull_recvs in plan.recvs:
            buf = pool.get()
            resp.append(buf)
            first = len(reqs)
            reqs.append(ep.tag_recv(buf.ucx, Tag(resp_tag | bits)))
            for ubuf, tag in pull_recvs:
                reqs.append(ep.tag_recv(ubuf, Tag(tag | bits)))
            bounds.append((first, len(reqs)))
        pend.inline = plan.small

        # 2. the request header, with the payload when small
        hbuf = pend.hbuf = self._req_pool.get()
        raw = hbuf.raw
        raw[: plan.hlen] = plan.template
        _SEQ.pack_into(raw, P.SEQ_OFFSET, seq)
        base = hbuf.ptr
        for off, src, n in plan.copies:  # inline tensors are host tensors (device ones never are)
            memmove(base + off, src, n)
        header = memory_buffer(hbuf.ptr, plan.length, False)

        # 3. send to every server (device data: once the caller's stream has produced it)
        req_tag = Tag(plan.req_tag | bits)
        pend.sends = [(header, req_tag)] + [(ubuf, Tag(tag | bits)) for ubuf, tag in plan.push_sends]
        self._pending[handle] = pend
        if event is None or event.query():
            self._send(pend)
        else:  # the stream is still busy: post the sends from a later call, never block here
            pend.event = event
            self._deferred.append(pend)
        return handle

    def _send(self, pend: _Pending) -> None:
        reqs = pend.reqs
        for ep in self._server_eps:
            for ubuf, tag in pend.sends:
                reqs.append(ep.tag_send(ubuf, tag))
        pend.sends = None
        pend.event = None
        pend.t_sent = time.monotonic_ns()

    def _send_deferred(self) -> None:
        """Post the sends of push_pulls whose CUDA event has completed since."""
        still = []
        for pend in self._deferred:
            if pend.event.query():
                self._send(pend)
            else:
                still.append(pend)
        self._deferred = still

    def _plan(
        self, push_tensors: Any, push_keys: Any, pull_tensors: Any, pull_keys: Any, need_event: Any
    ) -> _Plan:
        """Validate a call's arguments and precompute what does not change between calls.

        Raises:
            ArgumentError: naming the offending argument.
        """
        push = check_tensors("push_tensors", push_tensors)
        keys = check_keys("push_keys", push_keys, len(push), "push_tensors")
        pulls = check_tensors("pull_tensors", pull_tensors)
        pkeys = check_keys("pull_keys", pull_keys, len(pulls), "pull_tensors")
        if not isinstance(need_event, bool):
            raise ArgumentError(f"need_event must be a bool, got {type(need_event).__name__}")
        n_servers = len(self.servers)
        if len(pulls) % n_servers:
            raise ArgumentError(
                f"pull_tensors has {len(pulls)} tensors; it must be a multiple of the "
                f"{n_servers} servers (pull_tensors[s*P + j] is server s's j-th answer)"
            )
        if len(push) > P.MAX_TENSORS:
            raise ArgumentError(f"push_tensors has {len(push)} tensors, more than {P.MAX_TENSORS}")
        if len(pulls) > P.MAX_PULLS:
            raise ArgumentError(f"pull_tensors has {len(pulls)} tensors, more than {P.MAX_PULLS}")
        for name, ts in (("push_tensors", push), ("pull_tensors", pulls)):
            for i, t in enumerate(ts):
                if t.nbytes > P.MAX_TENSOR_BYTES:
                    raise ArgumentError(f"{name}[{i}] has {t.nbytes} bytes, more than {P.MAX_TENSOR_BYTES}")
        for i, t in enumerate(push):
            if t.dim() > P.MAX_NDIM:
                raise ArgumentError(f"push_tensors[{i}] has {t.dim()} dimensions, more than {P.MAX_NDIM}")
        shapes = [tuple(t.shape) for t in push]
        hsize = P.request_header_size(shapes, len(pulls))
        if hsize > P.HEADER_MAX:
            raise ArgumentError(
                f"push_tensors/pull_tensors describe a {hsize}-byte header, more than {P.HEADER_MAX}"
            )
        plan = _Plan()
        per = plan.per = len(pulls) // n_servers
        plan.n_servers = n_servers
        plan.pulls = pulls
        sizes = [t.nbytes for t in push]
        caps = [t.nbytes for t in pulls]
        # Device tensors never ride inline: that would need a synchronous copy
        # through host memory; UCX moves each by its device transports instead.
        on_host = not any(t.is_cuda for t in push) and not any(t.is_cuda for t in pulls)
        plan.inline = inline = P.inline_split(sizes, on_host)
        me = self.node_id

        resp_size = P.response_header_size(per)
        plan.small = []
        plan.recvs = []
        for s, (peer, ep) in enumerate(zip(self.servers, self._server_eps)):
            mine = caps[s * per : (s + 1) * per]
            fits = P.inline_split(mine, on_host)
            size = resp_size + sum(c for c, f in zip(mine, fits) if f)
            pool = self._resp_pools.get(size)
            if pool is None:
                pool = self._resp_pools[size] = BufferPool(size)
            sid = peer.node_id
            pull_recvs = [
                (as_buffer(pulls[s * per + j]), P.make_tag(P.TAG_PULL, sid, 0, j)) for j in range(per) if not fits[j]
            ]
            plan.small.append(fits)
            plan.recvs.append((ep, pool, P.make_tag(P.TAG_RESPONSE, sid), pull_recvs))

        template = np.zeros(hsize, dtype=np.uint8)
        flags = P.FLAG_INLINE if on_host else P.FLAG_DEVICE
        P.REQ_FIXED.pack_into(template, 0, P.DATA_VERSION, flags, len(push), n_servers, per, 0)
        pos = P.REQ_FIXED.size
        for t, key, shape, nbytes in zip(push, keys, shapes, sizes):
            st = P.tensor_struct(len(shape))
            st.pack_into(template, pos, key, DTYPE_CODE[t.dtype], len(shape), nbytes, *shape)
            pos += st.size
        for key, cap in zip(pkeys, caps):
            P.REQ_PULL.pack_into(template, pos, key, cap)
            pos += P.REQ_PULL.size
        plan.template = template
        plan.hlen = hsize
        plan.length = hsize + sum(n for n, f in zip(sizes, inline) if f)
        plan.copies = []
        off = hsize
        for t, n, f in zip(push, sizes, inline):
            if f:
                if n:
                    plan.copies.append((off, t.data_ptr(), n))
                off += n
        plan.push_sends = [
            (as_buffer(t), P.make_tag(P.TAG_PUSH, me, 0, i)) for i, t in enumerate(push) if not inline[i]
        ]
        plan.req_tag = P.make_tag(P.TAG_REQUEST, me)
        plan.event = None
        if need_event and any(t.is_cuda for t in push):
            from .backends import select

            backend = select(None, next(t for t in push if t.is_cuda))
            plan.event = backend.record_event
        return plan

    def _check_servers(self) -> None:
        if self._returned:
            self._reconnect()
        self.check_alive()
        if self.dead:
            for peer in self.servers:
                if peer.node_id in self.dead:
                    raise PeerError(self.dead[peer.node_id], "server", peer.rank)

    # ------------------------------------------------------------------ wait
    def wait(self, handle: int, timeout_ms: int = 10000) -> None:
        """Block until that push_pull is complete: pushes delivered, pulls written.

        Raises:
            ArgumentError: unknown handle (never issued, or already waited for).
            TimeoutError: not complete within ``timeout_ms`` (the handle stays valid).
            PeerError: a server died, or refused to answer (a response too large, say).
            ProtocolError: a malformed response.
        """
        pend = self._pending.get(handle)
        if pend is None:
            raise ArgumentError(f"handle {handle!r} is unknown: never returned by push_pull, or already waited for")
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, (int, float)) or timeout_ms < 0:
            raise ArgumentError(f"timeout_ms must be a non-negative number, got {timeout_ms!r}")
        reqs = pend.reqs
        data = self.data
        assert data is not None
        deadline = time.monotonic() + timeout_ms / 1000
        bounds = pend.bounds
        arrived = [0] * len(bounds)  # when each server's answer was seen complete
        waiting = list(range(len(bounds)))
        first = [bounds[-1][1]]  # sends before this index are known complete

        def done() -> bool:
            if self._deferred:
                self._send_deferred()
            if waiting:
                for s in tuple(waiting):
                    a, b = bounds[s]
                    while a < b and reqs[a].completed:
                        a += 1
                    if a == b:
                        arrived[s] = time.monotonic_ns()
                        waiting.remove(s)
                    else:
                        bounds[s] = (a, b)
                if waiting:
                    return False
            if pend.sends is not None:  # still waiting for the caller's stream
                return False
            i = first[0]
            n = len(reqs)
            while i < n and reqs[i].completed:
                i += 1
            first[0] = i
            return i == n

        if not done() and not data.progress_until(done, deadline, self._check_servers):
            who = ", ".join(self.servers[s].describe() for s in waiting)
            raise TimeoutError(
                f"push_pull handle {handle} not complete after {timeout_ms} ms; "
                f"no response yet from: {who or 'none (sends still in flight)'}"
            )
        del self._pending[handle]
        try:
            for r in reqs:
                r.check_error()
        except Exception as e:
            raise ProtocolError(f"push_pull handle {handle}: UCX reported {type(e).__name__}: {e}") from e
        traces = self._traces
        traces[handle] = self._finish(pend, arrived)
        if len(traces) > _TRACE_KEEP:
            traces.popitem(last=False)

    def _finish(self, pend: _Pending, arrived: list[int]) -> list[list[int]]:
        per = pend.per_server
        traces = []
        error: StepMeshError | None = None
        for s, (buf, fits) in enumerate(zip(pend.resp, pend.inline)):
            raw = buf.raw
            peer = self.servers[s]
            try:
                version, flags, status, n, seq, t_recv, t_proc, t_resp, t_rsent = P.RESP_FIXED.unpack_from(raw, 0)
                if version != P.DATA_VERSION or seq != pend.seq or n != per:
                    raise ProtocolError(
                        f"bad response from {peer.describe()}: version {version}, seq {seq} "
                        f"(expected {pend.seq}), {n} answers (expected {per})"
                    )
                pos = P.RESP_FIXED.size
                if status != P.STATUS_OK:
                    r = P.Reader(raw[pos + P.RESP_SIZE.size * n :], "response error")
                    raise PeerError(f"{peer.describe()} refused to answer: {r.text()}", "server", peer.rank)
                sizes = P.response_sizes(n).unpack_from(raw, pos)
                pos += P.RESP_SIZE.size * n
                for j, nbytes in enumerate(sizes):
                    if fits[j]:
                        dst = pend.pulls[s * per + j]
                        if nbytes > dst.nbytes or pos + nbytes > len(raw):
                            raise ProtocolError(f"{peer.describe()} sent {nbytes} bytes for a smaller pull tensor")
                        if nbytes:
                            buf.take(pos, dst, nbytes)
                        pos += nbytes
                traces.append([pend.t_start, pend.t_sent, t_recv, t_proc, t_resp, t_rsent, arrived[s], 0])
            except StepMeshError as e:
                error = error or e
            finally:
                buf.release()
        if pend.hbuf is not None:
            pend.hbuf.release()
        if error is not None:
            raise error
        t_end = time.monotonic_ns()
        for tr in traces:
            tr[7] = t_end
        return traces

    # ------------------------------------------------------------- helpers
    def get_all_handlers(self, handle: int) -> list[int]:
        """The handle followed by one sub-handle per server (StepMesh's shape).

        Raises:
            ArgumentError: the handle was never issued by this worker.
        """
        if not isinstance(handle, int) or handle < 1 or handle >= self._next_handle:
            raise ArgumentError(f"handle {handle!r} was never returned by push_pull")
        return [handle + i for i in range(len(self.servers) + 1)]

    def fetch_trace(self, handle: int) -> list[int]:
        """Eight nanosecond stamps of a completed push_pull (or of one server's part).

        Request {start, postsend, postrecv, process}, response {start, postsend,
        postrecv, process}. The main handle reports the server that answered last.

        Raises:
            ArgumentError: no trace for that handle (not waited for yet, or too old).
        """
        traces = self._traces
        if isinstance(handle, int) and not isinstance(handle, bool):
            per_server = traces.get(handle)
            if per_server is not None:  # a main handle: the server that answered last
                return list(max(per_server, key=lambda tr: tr[6]))
            for s in range(1, len(self.servers) + 1):  # a sub-handle: handle - s is its main one
                per_server = traces.get(handle - s)
                if per_server is not None and s <= len(per_server):
                    return list(per_server[s - 1])
        raise ArgumentError(
            f"no trace for handle {handle!r}: wait() for it first (the last {_TRACE_KEEP} push_pulls are kept)"
        )

    def on_peer_dead(self, node_id: int, text: str) -> None:
        pass  # wait() and push_pull() consult self.dead

    def on_peer_back(self, peer: P.Peer) -> None:
        """A server rejoined: address it at its new endpoint from the next push_pull on."""
        self._address_servers()
        self._plans.clear()  # they hold the old endpoints

    def _address_servers(self) -> None:
        self.servers = [p for p in self.peers if p.role is P.Role.SERVER]
        self._server_eps = [self.endpoints[p.node_id] for p in self.servers]
