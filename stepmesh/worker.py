"""The attention side: push hidden states to every server, pull the answers back.

One ``push_pull`` is, per server: one request message (header, plus the payload
when it is small) and, for large payloads, one tag message per push tensor
received by the server straight into its destination. Before anything is sent,
the receives for the answers are posted: the response header (with the payload
when small) and, for large answers, one receive per pull tensor, so the server's
data lands directly in the caller's tensors.

Small payloads are not copied here: UCX gathers the header and the push tensors
into the request message, and scatters a response with one small answer over
the header buffer and the pull tensor.

Where the C extension is built, each call of a known signature runs in its
``WorkerCore`` (posting, waiting, checking the responses, traces); this module
plans the signatures and words the errors. Without it the same protocol runs
here in Python.
"""

from __future__ import annotations

import numbers
import operator
import time
from collections import OrderedDict
from ctypes import memmove
from functools import partial
from typing import Any

import numpy as np
import torch

from . import protocol as P
from ._tensors import (
    DTYPE_CODE,
    BufferPool,
    HostBuffer,
    check_keys,
    check_tensors,
)
from ._ucp import IoVec, failure
from .errors import ArgumentError, PeerError, ProtocolError, StepMeshError, TimeoutError
from .node import Node

__all__ = ["AFTensorWorker"]

_TRACE_KEEP = 4096
_REFUSAL_WAIT_S = 5.0
_PLANS_KEEP = 256
# WorkerCore.wait() results
_W_DONE, _W_PENDING, _W_UNKNOWN, _W_BAD_TIMEOUT, _W_FAILED = range(5)
_SEQ = P.SEQ_STRUCT
_SEQ_OFFSET = P.SEQ_OFFSET
_SEQ_MASK = P.SEQ_MASK
_SEQ_SHIFT = P.SEQ_SHIFT
_now = time.monotonic_ns


def _check_timeout(timeout_ms: Any) -> None:
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, numbers.Real) or not timeout_ms >= 0:
        raise ArgumentError(f"timeout_ms must be a non-negative number, got {timeout_ms!r}")


class _Plan:
    """What a push_pull signature (buffers, shapes, dtypes, keys) needs, built once.

    It also owns the request buffers of that signature: each has the header
    already written, so a call only stamps the sequence number before sending
    it (with the inline push tensors gathered behind it by UCX).
    """

    __slots__ = (
        "endpoints", "ends", "eps", "event", "free", "gather", "hlen", "n_servers", "per", "release",
        "push_sends", "recvs", "req_tag", "resp_pos", "resp_struct", "servers", "starts", "takes", "template",
    )

    def header(self) -> HostBuffer:
        """A new request buffer with the header written (reused ones wait in ``free``)."""
        hb = HostBuffer(self.hlen)
        hb.raw[:] = self.template
        if self.gather:
            hb.iov = IoVec([(hb.ptr, self.hlen), *self.gather])
        return hb


class _Pending:
    """One push_pull in flight: its UCX requests and every buffer they use."""

    __slots__ = ("event", "hb", "keep", "keep_pull", "plan", "reqs", "resp", "seq", "sreqs", "t_sent", "t_start")

    def __init__(
        self, plan: _Plan, seq: int, hb: HostBuffer, keep: list[torch.Tensor], pulls: list[torch.Tensor], t_start: int
    ) -> None:
        self.plan = plan
        self.seq = seq
        self.hb = hb
        self.keep = keep  # the push tensors and (below) the pull tensors, alive until complete: a plan holds none
        self.keep_pull = pulls
        self.t_start = t_start
        self.t_sent = 0
        self.reqs: list[Any] = []  # receives, server by server: reqs[starts[s]:ends[s]] are server s's
        self.sreqs: list[Any] | None = None  # sends; None until posted (a CUDA event may hold them back)
        self.resp: list[HostBuffer] = []
        self.event: Any = None


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
        self._traces: OrderedDict[int, tuple[int, int, list[tuple[int, ...]], list[int], int]] = OrderedDict()
        self._resp_pools: dict[int, BufferPool] = {}
        self.servers: list[P.Peer] = []
        self._server_endpoints: list[Any] = []
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()
        self._deferred: list[Any] = []  # _Pending, or (handle, event, plan) with the C core
        self._ops: Any = None
        self._core: Any = None  # stepmesh._ucpc.WorkerCore where the C extension is built
        self._spins = 0

    def start(self) -> None:
        super().start()
        data = self.data
        assert data is not None
        self._ops = data.ops
        self._address_servers()
        native = data.native
        if native is not None:
            self._core = native.WorkerCore(
                self._ops, self._pending, len(self.servers), P.DATA_VERSION, P.MAX_IN_FLIGHT, _TRACE_KEEP
            )
            data.on_close(self._core.close)
            self._spins = data.core_spins

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
        core = self._core
        if core is not None and self._fatal is None and not self.dead and not self._deferred and not self._stopped:
            # A signature the core remembers: matched, posted and returned without Python.
            handle = core.call(push_tensors, push_keys, pull_tensors, pull_keys, need_event)
            if handle is not None:
                return handle
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
            parts = [need_event, *push_keys, None, *pull_keys, None]
            for t in push_tensors:
                parts += (t.data_ptr(), t.shape, t.dtype, t.is_contiguous(), t.is_cuda)
            parts.append(None)
            for t in pull_tensors:
                parts += (t.data_ptr(), t.shape, t.dtype, t.is_contiguous(), t.is_cuda)
            sig: tuple | None = tuple(parts)
            plan = self._plans.get(sig)
        except (TypeError, AttributeError):  # not lists of tensors: the slow path names the problem
            sig, plan = None, None
        if plan is None:
            plan = self._plan(push_tensors, push_keys, pull_tensors, pull_keys, need_event)
            if sig is not None:
                self._plans[sig] = plan
                if len(self._plans) > _PLANS_KEEP:
                    self._plans.popitem(last=False)
        if core is not None:  # plan is the C core's (its owner the _Plan)
            if plan.event is None:
                core.remember(plan, push_tensors, push_keys, pull_tensors, pull_keys, need_event)
                handle = core.push_pull(plan, push_tensors, pull_tensors, True)
                if handle is not None:
                    return handle
            return self._push_pull_native(core, plan, push_tensors, pull_tensors)
        pending = self._pending
        self._check_in_flight()
        event = plan.event() if plan.event is not None else None
        t_start = _now()
        seq = self._seq = (self._seq + 1) & _SEQ_MASK
        handle = self._next_handle
        self._next_handle = handle + plan.n_servers + 1
        hb = plan.free.pop() if plan.free else plan.header()
        _SEQ.pack_into(hb.raw, _SEQ_OFFSET, seq)
        # The request leaves first; bookkeeping and the receives for the answers
        # follow while it travels (no answer can come before the request has
        # arrived and been served; one that did would wait in UCX's queue).
        if event is None or event.query():
            sreqs = self._post(plan, seq, hb)
            t_sent = _now()
            pend = pending[handle] = _Pending(plan, seq, hb, push_tensors, pull_tensors, t_start)
            pend.sreqs = sreqs
            pend.t_sent = t_sent
            if event is not None:  # completed: the backend may record it again
                plan.release(event)
        else:  # the stream is still producing the pushes: post the sends from a later call, never block here
            pend = pending[handle] = _Pending(plan, seq, hb, push_tensors, pull_tensors, t_start)
            pend.event = event
            self._deferred.append(pend)
        ops = self._ops
        recv = ops.recv
        bits = seq << _SEQ_SHIFT
        reqs = pend.reqs
        resp = pend.resp
        for pool, resp_tag, pull_recvs, scatter in plan.recvs:
            buf = pool.get()
            resp.append(buf)
            if scatter is None:
                reqs.append(recv(buf.ptr, pool.size, resp_tag | bits))
            else:  # the pool is this plan's: a buffer's pieces, once set, stay right
                iov = buf.iov
                if iov is None:
                    iov = buf.iov = IoVec([(buf.ptr, pool.size), scatter])
                reqs.append(ops.recv_iov(iov, resp_tag | bits))
            for ptr, n, tag in pull_recvs:
                reqs.append(recv(ptr, n, tag | bits))
        return handle

    def _check_in_flight(self) -> None:
        n = len(self._pending)
        if n >= P.MAX_IN_FLIGHT:
            raise ArgumentError(
                f"push_pull: {n} calls are already in flight (the limit is {P.MAX_IN_FLIGHT}); wait() for some first"
            )

    def _push_pull_native(
        self, core: Any, plan: Any, push_tensors: list[torch.Tensor], pull_tensors: list[torch.Tensor]
    ) -> int:
        """push_pull through the C core when the fast way did not do: the in-flight limit, or a CUDA event."""
        self._check_in_flight()
        event = plan.event()
        owner = plan.owner
        if event is None or event.query():
            handle = core.push_pull(plan, push_tensors, pull_tensors, True)
            if event is not None:
                owner.release(event)  # completed: the backend may record it again
        else:  # the stream is still producing the pushes: post the sends from a later call, never block here
            handle = core.push_pull(plan, push_tensors, pull_tensors, False)
            self._deferred.append((handle, event, owner))
        return handle

    def _post(self, plan: _Plan, seq: int, hb: HostBuffer) -> list[Any]:
        """Send the request (and each large push) to every server; the send requests."""
        ops = self._ops
        send = ops.send
        bits = seq << _SEQ_SHIFT
        tag = plan.req_tag | bits
        iov = hb.iov
        if iov is None:
            ptr = hb.ptr
            n = plan.hlen
            sreqs = [send(ep, ptr, n, tag) for ep in plan.eps]
        else:
            send_iov = ops.send_iov
            sreqs = [send_iov(ep, iov, tag) for ep in plan.eps]
        for ptr, n, slot_tag in plan.push_sends:
            tag = slot_tag | bits
            for ep in plan.eps:
                sreqs.append(send(ep, ptr, n, tag))
        return sreqs

    def _send_deferred(self) -> None:
        """Post the sends of push_pulls whose CUDA event has completed since."""
        still = []
        if self._core is not None:
            ready = []
            for item in self._deferred:
                (ready if item[1].query() else still).append(item)
            self._deferred = still  # before sending: a send UCX refuses raises, and that call is gone
            for _, event, plan in ready:
                plan.release(event)  # completed: the backend may record it again
            for handle, _, _ in ready:
                self._core.send(handle)
            return
        for pend in self._deferred:
            if pend.event.query():
                pend.sreqs = self._post(pend.plan, pend.seq, pend.hb)
                pend.t_sent = _now()
                pend.plan.release(pend.event)  # completed: the backend may record it again
                pend.event = None
            else:
                still.append(pend)
        self._deferred = still

    def _plan(
        self, push_tensors: Any, push_keys: Any, pull_tensors: Any, pull_keys: Any, need_event: Any
    ) -> Any:
        """Validate a call's arguments and precompute what does not change between calls.

        Returns the :class:`_Plan`, or with the C core its ``Plan`` (whose ``owner`` is the _Plan).

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
        sizes = [t.nbytes for t in push]
        caps = [t.nbytes for t in pulls]
        # Device tensors never ride inline: that would need a synchronous copy
        # through host memory; UCX moves each by its device transports instead.
        on_host = not any(t.is_cuda for t in push) and not any(t.is_cuda for t in pulls)
        inline = P.inline_split(sizes, on_host)
        me = self.node_id

        resp_size = P.response_header_size(per)
        plan.recvs = []
        plan.ends = []
        plan.starts = []
        plan.servers = range(n_servers)
        plan.takes = []
        plan.release = None
        plan.resp_struct = P.response_struct(per)
        plan.resp_pos = plan.resp_struct.size
        plan.endpoints = list(self._server_endpoints)  # keeps the handles in eps valid (a rejoin replaces them)
        plan.eps = [ep.handle for ep in plan.endpoints]  # ucp_ep_h, for the direct tag calls
        plan.free = []
        for s, peer in enumerate(self.servers):
            mine = caps[s * per : (s + 1) * per]
            fits = P.inline_split(mine, on_host)
            sid = peer.node_id
            pull_recvs = [
                (pulls[s * per + j].data_ptr(), mine[j], P.make_tag(P.TAG_PULL, sid, 0, j))
                for j in range(per)
                if not fits[j]
            ]
            # One small answer: UCX scatters the response over [header, that pull
            # tensor] (a refusal's text then comes apart). None, or several (the
            # server may send them shorter): received whole and copied out.
            one = P.scattered_answer(mine, fits)
            if one >= 0:
                pool = BufferPool(plan.resp_pos)  # this plan's own: its buffers keep their pieces
                scatter = (pulls[s * per + one].data_ptr(), mine[one])
            else:
                size = resp_size + sum(c for c, f in zip(mine, fits) if f)
                pool = self._resp_pools.get(size)
                if pool is None:
                    pool = self._resp_pools[size] = BufferPool(size)
                scatter = None
            plan.takes.append(  # (answer, where it goes or 0 when already there, capacity)
                [(j, 0 if j == one else pulls[s * per + j].data_ptr(), mine[j]) for j in range(per) if fits[j]]
            )
            plan.recvs.append((pool, P.make_tag(P.TAG_RESPONSE, sid), pull_recvs, scatter))
            plan.starts.append(plan.ends[-1] if plan.ends else 0)
            plan.ends.append(plan.starts[-1] + 1 + len(pull_recvs))

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
        plan.gather = [(t.data_ptr(), n) for t, n, f in zip(push, sizes, inline) if f and n]
        plan.push_sends = [
            (t.data_ptr(), t.nbytes, P.make_tag(P.TAG_PUSH, me, 0, i)) for i, t in enumerate(push) if not inline[i]
        ]
        plan.req_tag = P.make_tag(P.TAG_REQUEST, me)
        plan.event, plan.release = self._event_source(push) if need_event else (None, None)
        if self._core is None:
            return plan
        # The C core's plan refers to this one (never the other way round: no cycle to collect).
        return self.data.native.Plan(  # type: ignore[union-attr]
            plan, plan.eps, plan.req_tag, template.tobytes(), plan.gather, plan.push_sends,
            [
                (pool.size, resp_tag, scatter, pull_recvs, [(j, dst, cap) for j, dst, cap in take])
                for (pool, resp_tag, pull_recvs, scatter), take in zip(plan.recvs, plan.takes)
            ],
            plan.per, plan.resp_pos, plan.event,
        )

    @staticmethod
    def _event_source(push: list[torch.Tensor]) -> tuple[Any, Any]:
        """What records an event on the stream producing ``push`` (and takes it back), or (None, None) on the host."""
        for t in push:
            if t.is_cuda:
                from .backends import select

                backend = select(None, t)
                return partial(backend.record_event, t.device), backend.release_event  # the pushes' device's stream
        return None, None

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
        core = self._core
        if core is not None:
            rc = core.wait(handle, timeout_ms, self._spins)
            if rc:
                self._wait_native(handle, timeout_ms, rc)
            return
        pend = self._pending.get(handle)
        if pend is None:
            raise ArgumentError(f"handle {handle!r} is unknown: never returned by push_pull, or already waited for")
        _check_timeout(timeout_ms)
        if not self._complete(pend):
            data = self.data
            assert data is not None
            deadline = time.monotonic() + timeout_ms / 1000
            if self._deferred:  # sends wait for a CUDA event: look at it between progress steps
                done = data.progress_until(lambda: self._complete(pend), deadline, self._check_servers)
            else:
                done = data.wait_requests(pend.reqs + pend.sreqs, deadline, self._check_servers)  # type: ignore[operator]
            if not done:
                plan = pend.plan
                waiting = [
                    s for s in plan.servers if not all([r.completed for r in pend.reqs[plan.starts[s] : plan.ends[s]]])
                ]
                raise self._timed_out(handle, timeout_ms, waiting)
        del self._pending[handle]
        try:
            for r in pend.reqs:
                r.check_error()
            for r in pend.sreqs:  # type: ignore[union-attr]
                r.check_error()
        except Exception as e:
            raise ProtocolError(f"push_pull handle {handle}: UCX reported {type(e).__name__}: {e}") from e
        traces = self._traces
        traces[handle] = self._finish(pend)
        if len(traces) > _TRACE_KEEP:
            traces.popitem(last=False)

    def _wait_native(self, handle: Any, timeout_ms: Any, rc: int) -> None:
        """What ``WorkerCore.wait`` did not settle at once: odd arguments, waiting longer, failures."""
        core = self._core
        if rc == _W_BAD_TIMEOUT:
            _check_timeout(timeout_ms)
            timeout_ms = float(timeout_ms)  # a number of another type
            rc = core.wait(handle, timeout_ms, 0)
        if rc == _W_UNKNOWN and type(handle) is not int and not isinstance(handle, bool):
            try:
                handle = operator.index(handle)  # an integer of another type (numpy's, say)
            except TypeError:
                pass
            else:
                rc = core.wait(handle, timeout_ms, 0)
        if rc == _W_UNKNOWN:
            raise ArgumentError(f"handle {handle!r} is unknown: never returned by push_pull, or already waited for")
        if rc == _W_PENDING:
            rc = self._wait_longer(handle, timeout_ms)
        if rc == _W_FAILED:
            self._native_failure(handle)
        elif rc != _W_DONE:
            raise StepMeshError(f"push_pull handle {handle}: the C core's wait returned {rc}")

    def _wait_longer(self, handle: int, timeout_ms: float) -> int:
        """Wait for a call of the C core with the deadline, liveness checks and deferred sends.

        Raises:
            TimeoutError: not complete within ``timeout_ms``.
            PeerError: a server of this group is dead.
        """
        core = self._core
        data = self.data
        assert data is not None
        deadline = time.monotonic() + timeout_ms / 1000
        spins = self._spins
        result = [_W_PENDING]

        def done() -> bool:
            if self._deferred:
                self._send_deferred()
            result[0] = core.wait(handle, timeout_ms, 0)
            return result[0] != _W_PENDING

        while True:
            self._check_servers()
            if spins and not self._deferred:  # the busy-poll runs inside the core
                rc = core.wait(handle, timeout_ms, spins)
                if rc != _W_PENDING:
                    return rc
                if time.monotonic() < deadline:
                    continue
            elif data.progress_until(done, deadline, self._check_servers):
                return result[0]
            raise self._timed_out(handle, timeout_ms, core.waiting(handle) or [])

    def _timed_out(self, handle: int, timeout_ms: float, waiting: list[int]) -> TimeoutError:
        """The error of a wait that timed out while the servers ``waiting`` (indexes) had not answered."""
        names = ", ".join(self.servers[s].describe() for s in waiting) or "none (sends still in flight)"
        return TimeoutError(f"push_pull handle {handle} not complete after {timeout_ms} ms; no response yet from: {names}")

    def _too_long(self, s: int, n: int, cap: int) -> ProtocolError:
        return ProtocolError(f"{self.servers[s].describe()} sent {n} bytes for a {cap}-byte pull tensor")

    def _native_failure(self, handle: int) -> None:
        """Raise what went wrong with a call the C core reported failed.

        Raises:
            ProtocolError: UCX failed an operation, or a malformed response.
            PeerError: a server refused to answer (its reason).
        """
        call = self._core.take_failed()
        try:
            status = call.ucx_status()
            if status:
                e = failure(status)
                raise ProtocolError(f"push_pull handle {handle}: UCX reported {type(e).__name__}: {e}") from e
            plan = call.plan
            error: StepMeshError | None = None
            for s, problem in enumerate(call.problems()):
                if not problem:
                    continue
                raw = call.response(s)
                try:
                    if problem == 1:
                        self._bad_response(raw, plan, call.seq, s)
                    f = plan.resp_struct.unpack_from(raw, 0)
                    for j, _, cap in plan.takes[s]:
                        if f[9 + j] > cap:
                            raise self._too_long(s, f[9 + j], cap)
                    raise ProtocolError(f"{self.servers[s].describe()} sent answers that overrun its response")
                except StepMeshError as e:
                    error = error or e
            if error is not None:
                raise error
        finally:
            call.release()

    def _complete(self, pend: _Pending) -> bool:
        """Whether every receive and send of ``pend`` is done.

        Every receive is looked at each time, so that each records when it was
        seen complete: a server's trace stamp says when its own answer arrived
        (a slow server stands out).
        """
        if self._deferred:
            self._send_deferred()
        done = all([r.completed for r in pend.reqs])
        sreqs = pend.sreqs
        if sreqs is None:  # still waiting for the caller's stream
            return False
        for r in sreqs:
            if not r.completed:
                return False
        return done

    def _finish(self, pend: _Pending) -> tuple[int, int, list[tuple[int, ...]], list[int], int]:
        """Check every server's response and copy inline answers out; the trace's raw stamps."""
        plan = pend.plan
        unpack = plan.resp_struct.unpack_from
        expect = (P.DATA_VERSION, P.STATUS_OK, plan.per, pend.seq)
        stamps = []
        arrived = []
        reqs = pend.reqs
        starts = plan.starts
        ends = plan.ends
        error: StepMeshError | None = None
        for s, buf in enumerate(pend.resp):
            t = pend.t_sent  # (a receive that completed within its call has no stamp of its own)
            for i in range(starts[s], ends[s]):
                if reqs[i].t_done > t:
                    t = reqs[i].t_done
            arrived.append(t)
            try:
                f = unpack(buf.raw, 0)
                if (f[0], f[2], f[3], f[4]) != expect:
                    self._bad_response(buf.raw, plan, pend.seq, s)
                pos = plan.resp_pos
                base = buf.ptr
                for j, dst, cap in plan.takes[s]:  # answers that rode inline (host tensors)
                    n = f[9 + j]
                    if n > cap:
                        raise self._too_long(s, n, cap)
                    if dst:  # 0: UCX scattered it into place
                        memmove(dst, base + pos, n)
                        pos += n
                stamps.append(f[5:9])
            except StepMeshError as e:
                error = error or e
            finally:
                buf.release()
        plan.free.append(pend.hb)
        if error is not None:
            raise error
        return pend.t_start, pend.t_sent, stamps, arrived, _now()

    def _bad_response(self, raw: Any, plan: _Plan, seq: int, s: int) -> None:
        """Raise what is wrong with server ``s``'s response ``raw`` to call ``seq`` (a refusal, or a malformed one).

        Raises:
            PeerError: the server refused to answer (its reason).
            ProtocolError: wrong version, sequence or answer count.
        """
        peer = self.servers[s]
        version, _, status, n, got = P.RESP_FIXED.unpack_from(raw, 0)[:5]
        if version != P.DATA_VERSION or got != seq or n != plan.per:
            raise ProtocolError(
                f"bad response from {peer.describe()}: version {version}, seq {got} "
                f"(expected {seq}), {n} answers (expected {plan.per})"
            )
        if plan.recvs[s][3] is None:  # not scattered: the text follows the header
            text = P.Reader(raw[plan.resp_pos :], "response error").text()
        else:
            text = self._refusal_text(plan, seq, s)
        raise PeerError(f"{peer.describe()} refused to answer (status {status}): {text}", "server", peer.rank)

    def _refusal_text(self, plan: _Plan, seq: int, s: int) -> str:
        """A refusal's reason, sent apart from its header when the answer would have been scattered."""
        note = HostBuffer(4 + P.MAX_STRING)
        req = self._ops.recv(note.ptr, note.raw.size, plan.recvs[s][1] | (seq << _SEQ_SHIFT) | P.REFUSAL_SLOT)
        assert self.data is not None
        if not self.data.progress_until(lambda: req.completed, time.monotonic() + _REFUSAL_WAIT_S):
            self._ops.cancel(req)  # UCX must not write into ``note`` once it is gone
            self.data.progress_until(lambda: req.completed, time.monotonic() + _REFUSAL_WAIT_S)
            return f"(its reason did not arrive within {_REFUSAL_WAIT_S:.0f} s)"
        try:
            req.check_error()
            return P.Reader(note.raw, "refusal").text()
        except StepMeshError as e:
            return f"(its reason was unreadable: {e})"

    # ------------------------------------------------------------- helpers
    def get_all_handlers(self, handle: int) -> list[int]:
        """The handle followed by one sub-handle per server (StepMesh's shape).

        Raises:
            ArgumentError: the handle was never returned by push_pull (a sub-handle included).
        """
        issued = self._core.next_handle if self._core is not None else self._next_handle
        if isinstance(handle, bool) or not isinstance(handle, int) or handle < 1 or handle >= issued:
            raise ArgumentError(f"handle {handle!r} was never returned by push_pull")
        main, sub = self._split_handle(handle)
        if sub:
            raise ArgumentError(f"handle {handle!r} is a sub-handle of push_pull handle {main}")
        return [handle + i for i in range(len(self.servers) + 1)]

    def _split_handle(self, handle: int) -> tuple[int, int]:
        """(push_pull handle, 0 for itself or 1 + s for server s's sub-handle).

        push_pull hands out 1, 1 + step, 1 + 2 * step, ... with step = servers + 1.
        """
        sub = (handle - 1) % (len(self.servers) + 1)
        return handle - sub, sub

    def fetch_trace(self, handle: int) -> list[int]:
        """Eight nanosecond stamps of a completed push_pull (or of one server's part).

        Request {start, postsend, postrecv, process}, response {start, postsend,
        postrecv, process}. The main handle reports the server that answered last.

        Raises:
            ArgumentError: no trace for that handle (not waited for yet, or too old).
        """
        if isinstance(handle, int) and not isinstance(handle, bool):
            main, sub = self._split_handle(int(handle))
            per_server = self._trace_rows(main)
            if per_server is not None:
                if sub == 0:  # a main handle: the server that answered last
                    return max(per_server, key=lambda tr: tr[6])
                if sub <= len(per_server):
                    return per_server[sub - 1]
        raise ArgumentError(
            f"no trace for handle {handle!r}: wait() for it first (the last {_TRACE_KEEP} push_pulls are kept)"
        )

    def _trace_rows(self, main: int) -> list[list[int]] | None:
        """Per server [t_start, t_sent, 4 server stamps, answer seen, t_end] of push_pull ``main``, if kept."""
        if self._core is not None:
            return self._core.trace(main)
        entry = self._traces.get(main)
        if entry is None:
            return None
        t_start, t_sent, stamps, arrived, t_end = entry
        return [[t_start, t_sent, *st, t_done, t_end] for st, t_done in zip(stamps, arrived)]

    def on_peer_dead(self, node_id: int, text: str) -> None:
        pass  # wait() and push_pull() consult self.dead

    def on_peer_back(self, peer: P.Peer) -> None:
        """A server rejoined: address it at its new endpoint from the next push_pull on."""
        self._address_servers()
        self._plans.clear()  # they hold the old endpoints
        if self._core is not None:
            self._core.forget_plans()

    def _address_servers(self) -> None:
        self.servers = [p for p in self.peers if p.role is P.Role.SERVER]
        self._server_endpoints = [self.endpoints[p.node_id] for p in self.servers]
