"""The attention side: push hidden states to every server, pull the answers back.

A push_pull is, per server, one request message (the header, with small
tensors behind it) and one tag message per large push tensor; the answers come
back as one response message and one tag message per large answer, received
straight into the caller's pull tensors. The compiled core matches a call's
signature against the plans it was given and does all of that; this module
validates a new signature, plans it, and words every error.
"""

from __future__ import annotations

import numbers
import operator
import time
from typing import Any

import torch

from .. import backends
from ..control import messages as M
from ..control.node import Node
from ..control.transport import bound_core
from ..errors import ArgumentError, PeerError, ProtocolError, StepMeshError, TimeoutError, TransportError
from . import wire as W
from .tensors import DTYPE_CODE, check_keys, check_tensors, one_device

__all__ = ["AFTensorWorker"]

_DONE, _PENDING, _UNKNOWN, _FAILED = (int(r) for r in (W.Result.DONE, W.Result.PENDING, W.Result.UNKNOWN, W.Result.FAILED))
_SLICE_S = 0.1  # blocking mode: how long one sleep in UCX's event fd may last between liveness checks
_EVENT_SLICE_S = 0.0002  # ... while sends wait for a stream event, which UCX does not signal
_WAY = {W.Placement.WRITTEN: W.AnswerWay.WRITTEN, W.Placement.SEPARATE: W.AnswerWay.SEPARATE,
        W.Placement.LANE: W.AnswerWay.LANE}  # answers whose placement alone says how the core takes them in


def _check_timeout(timeout_ms: Any) -> float:
    if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, numbers.Real) or not float(timeout_ms) >= 0:
        raise ArgumentError(f"timeout_ms must be a non-negative number, got {timeout_ms!r}")
    return float(timeout_ms)


def _handle(handle: Any) -> int:
    if isinstance(handle, bool):
        raise ArgumentError(f"handle {handle!r} is not a push_pull handle")
    try:
        return operator.index(handle)
    except TypeError:
        raise ArgumentError(f"handle {handle!r} is not a push_pull handle (an int)") from None


def written_keys(ucp: Any, pulls: list[torch.Tensor], per: int, level: str) -> dict[int, tuple[Any, int, bytes]]:
    """Map and key the pull tensors whose answers a server may write one-sided (``wire.written_candidates`` of
    each server's ``per`` answers at ``level``): per pull index, the mapping (kept while the key is in use), its
    allocation's id and the packed key; the ones ``ucp.pack_rkey`` refuses, or whose key exceeds RKEY_MAX, are
    left out (their answers travel as messages)."""
    keys: dict[int, tuple[Any, int, bytes]] = {}
    for lo in range(0, len(pulls), per):
        share = range(lo, lo + per)
        may = W.written_candidates([pulls[q].nbytes for q in share], [pulls[q].is_cuda for q in share], level)
        for q, ok in zip(share, may):
            got = ucp.pack_rkey(pulls[q].data_ptr(), pulls[q].nbytes, pulls[q].is_cuda) if ok else None
            if got is not None and len(got[1]) <= W.RKEY_MAX:
                keys[q] = (got[0], got[2], got[1])
    return keys


class AFTensorWorker(Node):
    """A worker (attention instance): ``push_pull`` / ``wait`` against every server of its group.

    Args:
        config: node configuration; from the environment when None.
    """

    role = "worker"
    data_options = W.UCX_OPTIONS
    lane_options = W.LANE_OPTIONS
    wireup_tag = staticmethod(W.wireup_tag)

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.servers: list[M.Peer] = []
        self._core: Any = None
        self._spins = 0

    def start(self) -> None:
        super().start()
        assert self.data is not None
        self._address_servers()
        self._core = bound_core().Worker(self.data.ucp, len(self.servers))
        self.data.on_close(self._core.close)
        self._spins = self.data.core_spins

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

        With ``need_event`` (the default), device tensors are sent only once the
        work queued on the current stream before this call has completed, and
        the answers land only after it: the call is ordered after the stream
        without blocking. ``need_event=False`` is for callers who ordered things
        themselves (synchronised).

        Raises:
            ArgumentError: bad input, raised before anything is sent (names the argument),
                or too many calls in flight.
            PeerError: a server of this group is dead.
            StepMeshError: not initialised or already stopped.
        """
        if self.healthy:
            handle: int = self._core.push_pull(push_tensors, push_keys, pull_tensors, pull_keys, need_event)
            if handle > 0:
                return handle
        return self._push_pull_slow(push_tensors, push_keys, pull_tensors, pull_keys, need_event)

    def _push_pull_slow(self, push: Any, push_keys: Any, pull: Any, pull_keys: Any, need_event: Any) -> int:
        core = self._core
        if core is None or self._stopped:
            raise StepMeshError("push_pull() on a worker that is not running: call init() first")
        self._check_servers()
        if core.in_flight >= W.MAX_IN_FLIGHT:
            raise ArgumentError(
                f"push_pull: {core.in_flight} calls are already in flight (the limit is {W.MAX_IN_FLIGHT}); "
                "wait() for some first"
            )
        spec = self._plan(push, push_keys, pull, pull_keys, need_event)
        core.add_plan(spec)
        handle = core.push_pull(spec["push"], spec["push_keys"], spec["pull"], spec["pull_keys"], need_event)
        if handle > 0:
            return int(handle)
        raise StepMeshError(f"push_pull: the core refused a call it was just given the plan for ({W.Result(-handle).name})")

    def _plan(self, push_tensors: Any, push_keys: Any, pull_tensors: Any, pull_keys: Any, need_event: Any) -> dict[str, Any]:
        """Validate a call's arguments and plan everything that does not change between calls of its signature.

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
        if len(push) > W.MAX_TENSORS:
            raise ArgumentError(f"push_tensors has {len(push)} tensors, more than {W.MAX_TENSORS}")
        if len(pulls) > W.MAX_PULLS:
            raise ArgumentError(f"pull_tensors has {len(pulls)} tensors, more than {W.MAX_PULLS}")
        for name, ts in (("push_tensors", push), ("pull_tensors", pulls)):
            for i, t in enumerate(ts):
                if t.nbytes > W.MAX_TENSOR_BYTES:
                    raise ArgumentError(f"{name}[{i}] has {t.nbytes} bytes, more than {W.MAX_TENSOR_BYTES}")
        device = one_device([("push_tensors", push), ("pull_tensors", pulls)])
        if device >= 0:
            backends.bind_core_device(bound_core(), push[0] if push and push[0].is_cuda else pulls[0])
        hsize = W.request_header_size([t.dim() for t in push], len(pulls))
        if hsize > W.HEADER_MAX:
            raise ArgumentError(f"push_tensors/pull_tensors describe a {hsize}-byte header, more than {W.HEADER_MAX}")
        per = len(pulls) // n_servers
        sizes = [t.nbytes for t in push]
        on_device = [t.is_cuda for t in push]
        lanes = [self.lane_endpoints.get(p.node_id) for p in self.servers]
        every_lane = all(lanes)
        placements = W.push_placements(sizes, on_device, every_lane)
        caps = [t.nbytes for t in pulls]
        pull_device = [t.is_cuda for t in pulls]
        rkeys = self._written(pulls, per)
        with_keys = W.request_header_size([t.dim() for t in push], len(pulls), [k for _, _, k in rkeys.values()])
        if with_keys > W.HEADER_MAX:
            rkeys = {}  # the keys would not fit the header: those answers travel as messages
        else:
            hsize = with_keys
        answer_placements: list[W.Placement] = []
        for s in range(n_servers):
            part = slice(s * per, (s + 1) * per)
            answer_placements += W.answer_placements(caps[part], pull_device[part], every_lane,
                                                     [q in rkeys for q in range(s * per, (s + 1) * per)])

        header = bytearray(hsize)
        flags = W.FLAG_DEVICE if device >= 0 else 0
        W.REQ_FIXED.pack_into(header, 0, W.DATA_VERSION, flags, len(push), n_servers, per, 0)
        pos = W.REQ_FIXED.size
        for t, key, placement in zip(push, keys, placements):
            W.REQ_TENSOR.pack_into(header, pos, key, DTYPE_CODE[t.dtype], t.dim(), placement, int(t.is_cuda), t.nbytes)
            pos += W.REQ_TENSOR.size
            for d in t.shape:
                W.REQ_DIM.pack_into(header, pos, d)
                pos += W.REQ_DIM.size
        for key, cap, placement, dev in zip(pkeys, caps, answer_placements, pull_device):
            W.REQ_PULL.pack_into(header, pos, key, cap, placement, int(dev))
            pos += W.REQ_PULL.size
        for q, (_, _, rkey) in sorted(rkeys.items()):
            W.REQ_WRITTEN.pack_into(header, pos, pulls[q].data_ptr(), len(rkey))
            pos += W.REQ_WRITTEN.size
            header[pos : pos + len(rkey)] = rkey
            pos += len(rkey)
        inline, sep = [], []
        offset = hsize
        for i, (t, placement) in enumerate(zip(push, placements)):
            if placement is W.Placement.INLINE:
                inline.append((i, int(t.is_cuda), t.data_ptr(), t.nbytes, offset))
                offset += t.nbytes
            else:
                sep.append((t.data_ptr(), t.nbytes, i, placement is W.Placement.LANE, int(t.is_cuda)))

        resp_pos = W.response_header_size(per)
        servers = []
        inline_room = 0
        pinned = any(dev for _, dev, _, n, _ in inline if n)
        for s, peer in enumerate(self.servers):
            share = range(s * per, (s + 1) * per)
            inline_answers = [j for j, q in enumerate(share) if answer_placements[q] is W.Placement.INLINE and caps[q]]
            scatter = -1
            if len(inline_answers) == 1 and not pull_device[s * per + inline_answers[0]]:
                scatter = inline_answers[0]  # UCX puts it in place behind the header: no copy
            answers = []
            in_pack = [q for q in share if answer_placements[q] is W.Placement.PACKED]
            *ans_at, ans_pack_size = W.pack_offsets([caps[q] for q in in_pack])
            for j, q in enumerate(share):
                at = 0
                placement = answer_placements[q]
                if placement in _WAY:
                    how = _WAY[placement]
                elif placement is W.Placement.PACKED:
                    how, at = W.AnswerWay.PACKED, ans_at[in_pack.index(q)]
                elif j == scatter:
                    how = W.AnswerWay.SCATTER
                else:
                    how = W.AnswerWay.COPY
                    pinned = pinned or (pull_device[q] and caps[q] > 0)
                answers.append((int(pull_device[q]), pulls[q].data_ptr(), caps[q], how, at))
            inline_room = max(inline_room, sum(caps[q] for q in share if answer_placements[q] is W.Placement.INLINE))
            servers.append((
                W.make_tag(W.Tag.RESPONSE, peer.node_id), W.make_tag(W.Tag.PULL, peer.node_id), scatter, answers,
                ans_pack_size,
            ))
        endpoints = [self.endpoints[p.node_id] for p in self.servers]
        return {
            "push": push, "push_keys": keys, "pull": pulls, "pull_keys": pkeys, "need_event": need_event,
            "device": device, "pinned": pinned, "endpoints": endpoints + [ep for ep in lanes if ep is not None],
            "eps": [ep.handle for ep in endpoints], "lane_eps": [ep.handle if ep is not None else 0 for ep in lanes],
            "per": per, "n_handles": max(1, len(push) + per), "template": bytes(header), "hlen": offset,
            "req_tag": W.make_tag(W.Tag.REQUEST, self.node_id), "push_tag": W.make_tag(W.Tag.PUSH, self.node_id),
            "inline_push": inline, "sep_push": sep, "resp_pos": resp_pos, "resp_size": resp_pos + inline_room,
            "servers": servers, "written": {q: (m, bid) for q, (m, bid, _) in rkeys.items()},
        }

    def _written(self, pulls: list[torch.Tensor], per: int) -> dict[int, tuple[Any, int, bytes]]:
        """The answers servers will write one-sided into ``pulls`` at ``STEPMESH_ONE_SIDED`` (see
        :func:`written_keys`); none where the core does not write now."""
        level = self.config.one_sided
        if level == "off" or not self._core.writes:
            return {}
        assert self.data is not None
        return written_keys(self.data.ucp, pulls, per, level)

    def _check_servers(self) -> None:
        if self._returned:
            self._reconnect()
        self.check_alive()
        if self.dead:
            for peer in self.servers:
                if peer.node_id in self.dead:
                    raise PeerError(self.dead[peer.node_id], "server", peer.rank)

    # ------------------------------------------------------------------ wait
    def wait(self, handle: int, timeout_ms: float = 10000) -> None:
        """Block until that push_pull is complete: pushes delivered, pulls written.

        Every pull tensor holds its answer when this returns (device ones too:
        nothing is left queued on a stream).

        Raises:
            ArgumentError: unknown handle (never issued, or already waited for), or a bad timeout.
            TimeoutError: not complete within ``timeout_ms`` (the handle stays valid).
            PeerError: a server died, or refused to answer (its reason).
            ProtocolError: a malformed response.
            TransportError: UCX or the device driver failed an operation of the call.
        """
        core = self._core
        if core is not None and type(handle) is int:
            rc = core.wait(handle, self._spins)
            if rc == _DONE:
                return
        else:
            rc = _UNKNOWN if core is None else core.wait(_handle(handle), 0)
        self._wait_slow(_handle(handle), _check_timeout(timeout_ms), rc)

    def _wait_slow(self, handle: int, timeout_ms: float, rc: int) -> None:
        core = self._core
        if core is None:
            raise StepMeshError("wait() on a worker that is not running: call init() first")
        if rc == _UNKNOWN:
            raise ArgumentError(f"handle {handle!r} is unknown: never returned by push_pull, or already waited for")
        if rc == _PENDING:
            rc = self._wait_longer(handle, timeout_ms)
        if rc == _FAILED:
            raise self._failure(handle)
        if rc != _DONE:
            raise StepMeshError(f"push_pull handle {handle}: the core's wait returned {W.Result(rc).name}")

    def _wait_longer(self, handle: int, timeout_ms: float) -> int:
        """Wait for call ``handle`` with the deadline and liveness checks between slices of spinning or sleeping.

        Raises:
            TimeoutError: not complete within ``timeout_ms``.
            PeerError: a server of this group is dead.
        """
        core = self._core
        data = self.data
        assert data is not None
        deadline = time.monotonic() + timeout_ms / 1000
        spins = self._spins
        while True:
            self._check_servers()
            rc = core.wait(handle, spins)
            if rc != _PENDING:
                return int(rc)
            now = time.monotonic()
            if now >= deadline:
                raise self._timed_out(handle, timeout_ms, core.waiting(handle) or [])
            if not spins:  # blocking or thread mode: sleep until UCX has work (or the stream event is due)
                data.progress_once(max(0, int(min(deadline - now, _EVENT_SLICE_S if core.kick() else _SLICE_S) * 1000)))

    def _timed_out(self, handle: int, timeout_ms: float, waiting: list[int]) -> TimeoutError:
        names = ", ".join(self.servers[s].describe() for s in waiting) or "none (sends still in flight)"
        return TimeoutError(f"push_pull handle {handle} not complete after {timeout_ms:g} ms; no response yet from: {names}")

    def _failure(self, handle: int) -> StepMeshError:
        """The error of a call the core reported failed."""
        why = self._core.failure(handle)
        if why is None:
            return StepMeshError(f"push_pull handle {handle} failed, and the core kept no reason")
        kind, s = W.Failure(why[0]), why[1]
        who = self.servers[s].describe() if 0 <= s < len(self.servers) else "a server"
        if kind is W.Failure.REFUSED:
            return PeerError(f"{who} refused to answer push_pull handle {handle}: {why[2]}", "server", self.servers[s].rank)
        if kind is W.Failure.TOO_LONG:
            return ProtocolError(f"{who} sent {why[3]} bytes for a {why[4]}-byte pull tensor (answer {why[2]})")
        if kind is W.Failure.BAD_RESPONSE:
            return ProtocolError(
                f"bad response from {who}: version {why[2]} (expected {W.DATA_VERSION}), seq {why[3]}, {why[4]} answers"
            )
        if kind is W.Failure.DEVICE:
            return TransportError(f"copying the answer of {who} into device memory failed: driver error {why[2]}")
        return TransportError(f"push_pull handle {handle}: UCX failed an operation with {who}: {bound_core().status_text(why[2])}")

    # ------------------------------------------------------------- helpers
    def get_all_handlers(self, handle: int) -> list[int]:
        """StepMesh's handle list: the push_pull handle, then one per further push tensor and one per pull key
        of a server's share (``len(push) + len(pull) // num_servers`` in all); valid before and after ``wait``.

        Raises:
            ArgumentError: not a push_pull handle (a sub-handle included), or too old to be kept.
        """
        core = self._core
        info = core.handles_of(_handle(handle)) if core is not None else None
        if info is None:
            raise ArgumentError(f"handle {handle!r} was never returned by push_pull (or its trace is no longer kept)")
        first, count = info
        if first != handle:
            raise ArgumentError(f"handle {handle!r} is a sub-handle of push_pull handle {first}")
        return list(range(first, first + count))

    def fetch_trace(self, handle: int, server: int | None = None) -> list[int]:
        """Eight nanosecond stamps of a completed push_pull: request {start, postsend, postrecv, process},
        response {start, postsend, postrecv, process}.

        Every handle of a call (see :meth:`get_all_handlers`) reports the same call;
        by default the server that answered last, or ``server`` (an index).

        Raises:
            ArgumentError: no trace for that handle (not waited for yet, or too old), or no such server.
        """
        rows = self._core.trace(_handle(handle)) if self._core is not None else None
        if rows is None:
            raise ArgumentError(
                f"no trace for handle {handle!r}: wait() for it first (the last {W.TRACE_KEEP} push_pulls are kept)"
            )
        if server is None:
            return max(rows, key=lambda tr: tr[6])
        if isinstance(server, bool) or not isinstance(server, int) or not 0 <= server < len(rows):
            raise ArgumentError(f"server must be an index 0..{len(rows) - 1}, got {server!r}")
        return list(rows[server])

    def keep_moving(self) -> None:
        if self._core is not None:
            self._core.kick()

    def on_peer_back(self, peer: M.Peer) -> None:
        """A server rejoined: address it at its new endpoint from the next push_pull on."""
        self._address_servers()
        if self._core is not None:
            self._core.forget_plans()  # they hold the old endpoints

    def _address_servers(self) -> None:
        self.servers = [p for p in self.peers if p.role is M.Role.SERVER]
