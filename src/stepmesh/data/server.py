"""The FFN side: take a batch from every worker, answer straight into their buffers.

The compiled core keeps a ring of receive slots posted for each worker's
request headers, takes in requests of the layouts it knows (small tensors
copied out of the header, large ones received straight into their
destination: a registered buffer's chunk, or a fresh tensor), and stages and
sends the answers. This module decodes a layout the core has not seen,
decides where its tensors land, and words every error.
"""

from __future__ import annotations

import logging
import numbers
import operator
import time
from typing import Any

import numpy as np
import torch

from .. import backends
from ..control import messages as M
from ..control.node import Node
from ..control.transport import bound_core
from ..errors import ArgumentError, PeerError, ProtocolError, StepMeshError, TimeoutError
from . import wire as W
from .tensors import CODE_DTYPE, ITEMSIZE, byte_view, check_keys, check_tensors

__all__ = ["AFTensorServer"]

log = logging.getLogger("stepmesh.server")

_SLICE_S = 0.1  # blocking mode: how long one sleep in UCX's event fd may last between liveness checks
_EVENT_SLICE_S = 0.0002  # ... while answers wait for a stream event, which UCX does not signal
_FOREVER_S = 3600.0
_LEND_TIMEOUT_S = 10.0  # how long respond waits for a worker to take an answer sent from the caller's memory
_DONE = int(W.Result.DONE)


def _check_need_event(need_event: Any) -> None:
    if not isinstance(need_event, bool):
        raise ArgumentError(f"need_event must be a bool, got {type(need_event).__name__}")


class AFTensorServer(Node):
    """A server (FFN instance): ``get_batch`` from every worker, ``respond`` to each.

    Args:
        config: node configuration; from the environment when None.
    """

    role = "server"
    data_options = W.UCX_OPTIONS
    lane_options = W.LANE_OPTIONS
    wireup_tag = staticmethod(W.wireup_tag)

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.workers: list[M.Peer] = []
        self.server_index = 0
        self._core: Any = None
        self._spins = 0
        self._registered: dict[tuple[int, int], torch.Tensor] = {}
        self._n_servers = 0
        self._alloc_ctx: Any = None

    def start(self) -> None:
        super().start()
        cfg = self.config
        data = self.data
        assert data is not None
        self.workers = [p for p in self.peers if p.role is M.Role.WORKER]
        self.server_index = self.rank + (self.group * cfg.num_servers if cfg.topology == "full" else 0)
        self._n_servers = cfg.num_servers * (cfg.group_size if cfg.topology == "full" else 1)
        core = bound_core()
        gpu = self.config.backend in ("cuda", "rocm")
        if gpu:
            backends.get(cfg.backend).bind_core(core)  # type: ignore[arg-type]
        endpoints = [self.endpoints[p.node_id] for p in self.workers]
        lanes = [self.lane_endpoints.get(p.node_id) for p in self.workers]
        self._core = core.Server(
            data.ucp, [ep.handle for ep in endpoints], [ep.handle if ep is not None else 0 for ep in lanes],
            endpoints + [ep for ep in lanes if ep is not None],
            [W.make_tag(W.Tag.REQUEST, p.node_id) for p in self.workers],
            [W.make_tag(W.Tag.PUSH, p.node_id) for p in self.workers],
            W.make_tag(W.Tag.RESPONSE, self.node_id), W.make_tag(W.Tag.PULL, self.node_id),
            # pinned receive slots and response headers only where device tensors travel inline (staged through
            # them); otherwise UCX sees plain host memory
            gpu and W.DEVICE_INLINE_MAX > 0, cfg.gpu if gpu else -1,
        )
        data.on_close(self._core.close)
        self._spins = data.core_spins

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    @property
    def workers_stopped(self) -> bool:
        """Whether every worker of this server's group has entered ``stop()``: no request will come any more."""
        stopping = self.stopping
        return bool(stopping) and all(p.node_id in stopping for p in self.workers)

    # ------------------------------------------------------------ get_batch
    def get_batch(self, timeout_ms: float | None = None) -> list[tuple[int, list[torch.Tensor], list[int]]]:
        """One ``(handle, push_tensors, push_keys)`` per worker, in worker-rank order.

        Returns once every worker of the group has a request queued. With a
        timeout, returns ``[]`` when that does not happen in time; without one,
        waits as long as the workers are alive. Once every worker has entered
        ``stop()`` (:attr:`workers_stopped`), returns ``[]`` at once: a server
        loop ends with ``if not batch and stepmesh.workers_stopped(): break``,
        and StepMesh code that loops while ``len(batch) == 0`` keeps running.
        The tensors stay valid until their request is answered (``respond``):
        device ones hold their data when this returns.

        Raises:
            PeerError: a worker of this group (or the scheduler) died.
            ProtocolError: a worker sent a malformed request.
            ArgumentError: a bad timeout.
        """
        if self.healthy and timeout_ms is None:
            batch = self._core.get_batch(self._spins)
            if batch.__class__ is list:
                return batch
        return self._get_batch_slow(timeout_ms)

    def _get_batch_slow(self, timeout_ms: Any) -> list[tuple[int, list[torch.Tensor], list[int]]]:
        core = self._core
        data = self.data
        if core is None or data is None or self._stopped:
            raise StepMeshError("get_batch() on a server that is not running: call init() first")
        if timeout_ms is not None and (
            isinstance(timeout_ms, bool) or not isinstance(timeout_ms, numbers.Real) or not float(timeout_ms) >= 0
        ):
            raise ArgumentError(f"timeout_ms must be None or a non-negative number, got {timeout_ms!r}")
        forever = timeout_ms is None
        deadline = time.monotonic() + (_FOREVER_S if timeout_ms is None else float(timeout_ms) / 1000)
        spins = self._spins
        while True:
            self._check_workers()
            got = core.get_batch(spins)
            if got.__class__ is list:
                return got
            if got == W.Result.NEW_LAYOUT:
                self._learn()
                continue
            if got == W.Result.SLOT_FAILED:
                w, status = core.slot_failure()
                raise ProtocolError(
                    f"bad request from {self.workers[w].describe()}: UCX could not receive it "
                    f"({bound_core().status_text(status)})"
                )
            if got == W.Result.CLOSED:
                raise StepMeshError("get_batch() on a server that is not running: call init() first")
            if self.stopping and self.workers_stopped:
                return []  # nothing more will come (what came before was taken in above)
            now = time.monotonic()
            if now >= deadline:
                if not forever:
                    return []
                deadline = now + _FOREVER_S
            if not spins:  # blocking or thread mode: sleep until UCX has work (or a stream event is due)
                slice_s = _EVENT_SLICE_S if core.waiting_for_stream else _SLICE_S
                data.progress_once(max(0, int(min(deadline - now, slice_s) * 1000)))

    def _learn(self) -> None:
        """Decode the request of a layout the core does not know yet, and give the core its layout.

        Raises:
            ProtocolError: a malformed request, or one addressed to a mesh of another size.
        """
        core = self._core
        pending = core.pending_header()
        if pending is None:
            return
        w, raw = pending
        peer = self.workers[w]
        try:
            hdr = W.decode_request(raw, ITEMSIZE, lane=peer.node_id in self.lane_endpoints)
            if hdr.n_servers != self._n_servers:
                raise W.WireError(f"addressed {hdr.n_servers} servers, this mesh has {self._n_servers}")
        except W.WireError as e:
            core.skip_pending()
            raise ProtocolError(f"bad request from {peer.describe()}: {e}") from e
        core.add_layout(w, self._layout(w, hdr, raw))

    def _layout(self, w: int, hdr: W.RequestHeader, raw: bytes) -> dict[str, Any]:
        """Where each push of a request laid out as ``hdr`` lands under the buffers registered now."""
        pushes = []
        offset = hdr.size
        for m in hdr.tensors:
            view = self._registered_view(w, m)
            if view is None:
                fresh = self._fresh_device(m)
                dev = -1 if fresh.type == "cpu" else self.config.gpu
            else:
                fresh, dev = view.device, (view.get_device() if view.is_cuda else -1)
            pushes.append((m.placement, offset, m.nbytes, view, m.shape, CODE_DTYPE[m.dtype], dev, fresh))
            if m.placement is W.Placement.INLINE:
                offset += m.nbytes
        share = hdr.pulls_for(self.server_index)
        inline_room = sum(p.capacity for p in share if p.placement is W.Placement.INLINE)
        *ans_at, ans_pack_size = W.pack_offsets([p.capacity for p in share if p.placement is W.Placement.PACKED])
        pulls = [(p.placement, p.capacity, ans_at.pop(0) if p.placement is W.Placement.PACKED else 0, p.device,
                  p.address, p.rkey) for p in share]
        return {
            "head": raw[: hdr.size], "push": pushes, "keys": [m.key for m in hdr.tensors],
            "pull": pulls, "pull_keys": [p.key for p in share], "ans_pack_size": ans_pack_size,
            "resp_size": W.response_header_size(len(share)) + inline_room, "alloc_ctx": self._alloc_ctx,
        }

    def _fresh_device(self, m: W.TensorMeta) -> torch.device:
        """Where an unregistered push lands: this process's GPU (STEPMESH_GPU) with a GPU backend, or when the
        backend is not set and the worker's tensor was device memory (as StepMesh does); else host memory."""
        backend = self.config.backend
        if backend in ("cuda", "rocm") or (backend is None and m.device and torch.cuda.is_available()):
            if self._alloc_ctx is None:
                backends.bind_core_device(bound_core(), torch.empty(0, device=f"cuda:{self.config.gpu}"))
                # From a stream of its own: memory the caller freed while its stream may still
                # read it is never handed to UCX to write into.
                self._alloc_ctx = torch.cuda.stream(torch.cuda.Stream(device=self.config.gpu))  # type: ignore[no-untyped-call]
            return torch.device("cuda", self.config.gpu)
        return torch.device("cpu")

    def _registered_view(self, w: int, m: W.TensorMeta) -> torch.Tensor | None:
        """The registered chunk for (worker, key) viewed as ``m``, or None when none fits."""
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

    def _check_workers(self) -> None:
        self.check_alive()
        if self.dead:
            for peer in self.workers:
                if peer.node_id in self.dead:
                    raise PeerError(self.dead[peer.node_id], "worker", peer.rank)

    # -------------------------------------------------------------- respond
    def respond(self, tensors: list[torch.Tensor], handle: int, need_event: bool = True) -> None:
        """Answer a request: ``tensors[j]`` lands in the worker's pull tensor for its j-th key.

        A tensor may be smaller than the worker's buffer (its first bytes are
        written, the rest stays as it was), never larger. When this returns the
        answers' memory is the caller's again. Small host ones, and device ones
        packed or inline, were copied. Device ones sent as messages of their
        own (the lane's small ones too) are staged on the GPU behind the work
        still queued on the current stream, so that this returns at once; when
        that stream is idle (or ``need_event=False``), they are sent from the
        caller's memory instead, and this waits until the worker has taken
        them, as it does for large host ones (a copy costs more than the transfer). Device
        answers are taken after the work queued on the current stream before
        this call (``need_event=True``, the default); ``need_event=False``
        takes them as they are now.

        A bad answer is refused: the worker's ``wait`` fails at once with the
        reason, and this raises it.

        Raises:
            ArgumentError: unknown handle, wrong number of tensors, or a tensor that
                is not a contiguous tensor of a known dtype or does not fit the
                worker's buffer (the worker is told why; nothing else is sent).
            PeerError: the worker died.
            TimeoutError: the worker did not take an answer sent from the caller's memory within 10 s.
        """
        if self.healthy and type(handle) is int and need_event.__class__ is bool:
            core = self._core
            if core.respond(tensors, handle, need_event) == _DONE:
                if core.lent:
                    self._take_back()
                return
        self._respond_slow(tensors, handle, need_event)
        self._take_back()

    def _take_back(self) -> None:
        """Progress until UCX no longer reads answers from the caller's memory (large host answers, and device
        ones whose stream was idle or sent with ``need_event=False``, go without a copy: it would cost more
        than the transfer).

        Raises:
            PeerError: a worker died.
            TimeoutError: a worker did not take its answer within the lend timeout.
        """
        core, data = self._core, self.data
        if core is None or data is None or not core.lent:
            return
        def taken() -> bool:
            core.progress()  # reaps the answers UCX is done with
            return not core.lent

        if not data.progress_until(taken, time.monotonic() + _LEND_TIMEOUT_S, self._check_workers):
            raise TimeoutError(
                f"{core.lent} answer(s) not taken by their worker within {_LEND_TIMEOUT_S:g} s: UCX may still read "
                "their memory (a transport that needs the worker to progress, and a worker outside stepmesh?)"
            )

    def _respond_slow(self, tensors: Any, handle: Any, need_event: Any) -> None:
        core = self._core
        if core is None or self._stopped:
            raise StepMeshError("respond() on a server that is not running: call init() first")
        _check_need_event(need_event)
        self._check_workers()
        h = _as_handle(handle)
        info = core.request_info(h) if h is not None else None
        if info is None:
            raise ArgumentError(f"handle {handle!r} is unknown: not from get_batch, or already answered")
        problem = self._answer_problem(tensors, info, "tensors")
        if problem is not None:
            core.refuse(h, problem)
            raise ArgumentError(problem)
        if core.respond(list(tensors), h, need_event) != W.Result.DONE:
            raise StepMeshError(f"respond: the core refused answers stepmesh found valid (handle {h})")

    @staticmethod
    def _answer_problem(tensors: Any, info: tuple[list[int], list[tuple[int, int]]], name: str) -> str | None:
        """What is wrong with ``tensors`` as the answers to a request (keys, [(pull key, capacity)]), or None."""
        try:
            ts = check_tensors(name, tensors)
        except ArgumentError as e:
            return str(e)
        pulls = info[1]
        if len(ts) != len(pulls):
            return (
                f"{name} has {len(ts)} tensors but the worker asked this server for {len(pulls)} "
                f"(pull keys {[k for k, _ in pulls]})"
            )
        for j, (t, (key, cap)) in enumerate(zip(ts, pulls)):
            if t.nbytes > cap:
                return f"{name}[{j}] has {t.nbytes} bytes but the worker's pull tensor for key {key} holds only {cap}"
        return None

    def respond_vec(self, ret_buffer: torch.Tensor, tensors_vec: list[torch.Tensor], handles: list[int]) -> None:
        """Answer several requests from one buffer of rows laid back to back.

        Handle ``i`` receives the ``tensors_vec[i].shape[0]`` rows of ``ret_buffer``
        that follow those of handles ``0..i-1`` (StepMesh sent ``ret_buffer[:n_i]``
        to everyone, which is right only for one worker). Ordered after the
        current stream like ``respond``; ``ret_buffer`` may be written again as
        soon as this returns.

        Raises:
            ArgumentError: mismatched lengths, too few rows, duplicate or unknown
                handles, or answers that do not fit (all checked before anything
                is sent; the workers of the known handles are told why at once and
                none gets a partial answer).
            PeerError: a worker died.
            TimeoutError: a worker did not take an answer sent from ``ret_buffer``'s memory within 10 s
                (large host rows, or device rows whose stream had finished).
        """
        core = self._core
        if core is None or self._stopped:
            raise StepMeshError("respond_vec() on a server that is not running: call init() first")
        self._check_workers()
        hs = [_as_handle(h) for h in handles] if isinstance(handles, (list, tuple)) else []
        known = {h for h in hs if h is not None and core.request_info(h) is not None}
        try:
            parts = self._vec_parts(ret_buffer, tensors_vec, handles, hs)
        except ArgumentError as e:
            for k in known:  # every worker learns why, none gets a partial answer
                core.refuse(k, f"respond_vec refused the answers of this call: {e}")
            raise
        for h, part in zip(hs, parts):
            if core.respond(part, h, True) != W.Result.DONE:
                raise StepMeshError(f"respond_vec: the core refused answers stepmesh found valid (handle {h})")
        self._take_back()

    def _vec_parts(self, ret_buffer: Any, tensors_vec: Any, handles: Any, hs: list[int | None]) -> list[list[torch.Tensor]]:
        """respond_vec's answers, one list per handle, or the ArgumentError that names what is wrong."""
        if not isinstance(ret_buffer, torch.Tensor):
            raise ArgumentError(f"ret_buffer must be a torch.Tensor, got {type(ret_buffer).__name__}")
        try:
            (buf,) = check_tensors("ret_buffer", [ret_buffer])
        except ArgumentError as e:
            raise ArgumentError(str(e).replace("ret_buffer[0]", "ret_buffer", 1)) from None
        vec = check_tensors("tensors_vec", tensors_vec)
        if not isinstance(handles, (list, tuple)) or len(handles) != len(vec):
            raise ArgumentError(f"handles must be a list as long as tensors_vec ({len(vec)}), got {handles!r}")
        valid = [h for h in hs if h is not None]
        if len(set(valid)) != len(valid):
            raise ArgumentError(f"handles has duplicates: {list(handles)!r}; each request is answered once")
        rows = [t.shape[0] if t.dim() else 1 for t in vec]
        if buf.dim() == 0 or sum(rows) > buf.shape[0]:
            raise ArgumentError(f"ret_buffer has {buf.shape[0] if buf.dim() else 0} rows, tensors_vec asks for {sum(rows)}")
        core = self._core
        parts = []
        off = 0
        for i, (h, raw, n) in enumerate(zip(hs, handles, rows)):
            part = [buf[off : off + n]]
            off += n
            info = core.request_info(h) if h is not None else None
            if info is None:
                raise ArgumentError(f"handles[{i}] = {raw!r} is unknown: not from get_batch, or already answered")
            problem = self._answer_problem(part, info, f"ret_buffer rows for handles[{i}]")
            if problem is not None:
                raise ArgumentError(problem)
            parts.append(part)
        return parts

    def flush(self, timeout_ms: float = 10000) -> None:
        """Wait until every answer given so far has been delivered.

        UCX moves an answer while this process calls into stepmesh (get_batch,
        flush, stop); with some transports (CUDA IPC, TCP rendezvous) a large
        answer does not finish while the server computes or sleeps elsewhere.
        Call this before long work outside stepmesh (answer buffers are already
        free to reuse: this is about delivery, not memory).

        Raises:
            TimeoutError: not delivered within ``timeout_ms``.
            PeerError: a worker died.
        """
        core = self._core
        data = self.data
        if core is None or data is None or self._stopped:
            raise StepMeshError("flush() on a server that is not running: call init() first")
        if not data.progress_until(lambda: not core.progress(), time.monotonic() + timeout_ms / 1000, self._check_workers):
            raise TimeoutError(f"{core.progress()} answer(s) not delivered after {timeout_ms} ms")

    def keep_moving(self) -> None:
        if self._core is not None:
            self._core.progress()

    # ------------------------------------------------------ registered memory
    def register_recv_buffer(self, tensor: torch.Tensor, worker_ranks: list[int], push_keys: list[int]) -> None:
        """Receive worker ``worker_ranks[i]``'s pushes of key ``push_keys[i]`` straight into chunk ``i`` of ``tensor``.

        StepMesh's semantics: the lists have the same length, and ``tensor`` is
        split evenly by bytes into ``len(worker_ranks)`` chunks. A push that fits
        its chunk lands there with no allocation; the tensors ``get_batch``
        returns for it are views of the chunk (valid until the request is
        answered: the next push of that key lands in the same place).

        Raises:
            ArgumentError: not a contiguous tensor, lists of different lengths, an
                unknown worker rank, or a size that does not split evenly.
        """
        (t,) = check_tensors("tensor", [tensor])
        if not isinstance(worker_ranks, (list, tuple)) or not worker_ranks:
            raise ArgumentError(f"worker_ranks must be a non-empty list of ranks, got {worker_ranks!r}")
        n_workers = len(self.workers) if self.workers else self.config.num_workers
        for i, w in enumerate(worker_ranks):
            if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w < n_workers:
                raise ArgumentError(f"worker_ranks[{i}] = {w!r} is not a worker rank 0..{n_workers - 1}")
        if not isinstance(push_keys, (list, tuple)) or len(push_keys) != len(worker_ranks):
            raise ArgumentError(
                f"push_keys must be a list as long as worker_ranks ({len(worker_ranks)}): chunk i takes key "
                f"push_keys[i] from worker worker_ranks[i]; got {push_keys!r}"
            )
        keys = check_keys("push_keys", push_keys, len(worker_ranks), "worker_ranks")
        raw = byte_view(t)
        n = len(worker_ranks)
        if raw.numel() % n:
            raise ArgumentError(f"tensor has {raw.numel()} bytes, which do not split evenly into {n} chunks")
        size = raw.numel() // n
        for i, (w, key) in enumerate(zip(worker_ranks, keys)):
            self._registered[(w, key)] = raw[i * size : (i + 1) * size]
        if self._core is not None:  # its layouts point at the chunks registered before
            self._core.forget_layouts()

    def on_peer_dead(self, node_id: int, text: str) -> None:
        pass  # get_batch() and respond() consult self.dead


def _as_handle(h: Any) -> int | None:
    """A handle as an int (numpy integers included), or None when it cannot be one."""
    if isinstance(h, (bool, np.bool_)):
        return None
    try:
        return operator.index(h)
    except TypeError:
        return None
