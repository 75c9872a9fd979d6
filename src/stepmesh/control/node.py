"""Membership of a worker or server: registration, address book, wire-up, barriers, liveness.

A node owns two UCX workers: the data worker (tag messages to its peers,
progressed by the caller's thread in the configured progress mode; on a GPU
host with a *lane* beside it for small device messages, see
``stepmesh.data.wire``) and the control worker (active messages to the
scheduler over TCP, progressed by a background thread that sleeps in epoll). Keeping control apart lets heartbeats
flow while the caller computes, and keeps the data path free of control traffic.
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._version import __version__
from ..config import Config
from ..errors import ArgumentError, AuthError, ConfigError, PeerError, ProtocolError, StepMeshError, TimeoutError
from . import messages as P
from .transport import ControlChannel, EventLoop, Transport, Waker

__all__ = ["Node", "NodeInfo"]


@dataclass(frozen=True)
class NodeInfo:
    """Who this process is in the mesh (``stepmesh.node_info()``).

    ``num_workers``/``num_servers`` count the peers this node exchanges data
    with: a worker's pull lists are sized by ``num_servers`` (all groups' servers
    in the ``full`` topology).
    """

    role: str
    rank: int
    group: int
    group_size: int
    num_workers: int
    num_servers: int
    node_id: int

log = logging.getLogger("stepmesh.node")

_ERRORS: dict[int, type[StepMeshError]] = {
    P.ErrorCode.CONFIG: ConfigError,
    P.ErrorCode.TIMEOUT: TimeoutError,
    P.ErrorCode.AUTH: AuthError,
    P.ErrorCode.PROTOCOL: ProtocolError,
    P.ErrorCode.SHUTDOWN: PeerError,
    P.ErrorCode.PEER: PeerError,
}
_CONNECT_RETRY_S = 0.2
_VERDICT_GRACE_S = 2.0


@dataclass
class _Wireup:
    """The wire-up messages exchanged with one peer: per path (data path, device lane) a receive, a send and the echo."""

    peer: P.Peer
    token: np.ndarray
    paths: list[tuple[str, Any, Any, np.ndarray]] = field(default_factory=list)

    @property
    def completed(self) -> bool:
        return all(recv.completed and send.completed for _, recv, send, _ in self.paths)

    def describe_missing(self) -> str:
        """The peer and the paths whose ping has not arrived or not left (on the lane even 8 bytes go by
        rendezvous, which completes only when the peer takes them)."""
        missing = [path for path, recv, send, _ in self.paths if not (recv.completed and send.completed)]
        return f"{self.peer.describe()} ({' and '.join(missing)})"

    def check(self) -> None:
        """Raises: TransportError when a message failed; ProtocolError when the echo names another node."""
        for path, recv, send, echo in self.paths:
            recv.check_error()
            send.check_error()
            if int(echo[0]) != self.peer.node_id:
                raise ProtocolError(f"{path} wire-up from {self.peer.describe()} carried node id {int(echo[0])}")


class Node:
    """Base of :class:`~stepmesh.AFTensorWorker` and :class:`~stepmesh.AFTensorServer`.

    The data plane tells it the UCX options of its data worker and of its lane,
    and the tag of a peer's wire-up message (``data_options``, ``lane_options``,
    ``wireup_tag``).
    """

    role: str = ""
    data_options: dict[str, str] = {}
    lane_options: dict[str, str] = {}

    @staticmethod
    def wireup_tag(node_id: int) -> int:
        """The tag of the one wire-up message node ``node_id`` sends each peer."""
        raise NotImplementedError

    def __init__(self, config: Config | None = None) -> None:
        cfg = config if config is not None else Config.from_env(role=self.role)
        if cfg.role is None:
            cfg = cfg.replace(role=self.role)
        if cfg.role != self.role:
            raise ConfigError(f"DMLC_ROLE (role) = {cfg.role!r}, but this is a {self.role}")
        if cfg.root_port is None:
            raise ConfigError("DMLC_PS_ROOT_PORT (root_port) is not set: where is the scheduler?")
        self.config = cfg
        self.node_id = 0
        self.rank = cfg.node_rank if cfg.node_rank is not None else -1
        self.group = cfg.group
        self.peers: list[P.Peer] = []
        self.endpoints: dict[int, Any] = {}
        self.lane_endpoints: dict[int, Any] = {}  # to the peers that have a lane, when this node has one
        self.dead: dict[int, str] = {}
        self.stopping: set[int] = set()  # peers that entered stop(): they send nothing more
        self.data: Transport | None = None
        self._control: Transport | None = None
        self._channel: ControlChannel | None = None
        self._unpinned: set[int] = set()  # the cores allowed before _bind_core, for the control thread
        self._challenge: bytes | None = None  # the scheduler's nonce, once it asked for the token
        self._auth_nonce = os.urandom(P.AUTH_NONCE_BYTES)  # ours, for the scheduler to prove itself
        self._loop: EventLoop | None = None
        self._waker = Waker()
        self._thread: threading.Thread | None = None
        self._lock = threading.Condition()
        self._welcome: P.Control | None = None
        self._register_message = b""
        self._returned: list[P.Peer] = []
        self._wireups: list[_Wireup] = []
        self._book: P.Control | None = None
        self._fatal: StepMeshError | None = None
        self._releases: dict[tuple[int, int], P.Control] = {}
        self._barrier_seq: dict[int, int] = {}
        self._last_heard = 0.0
        self._running = False
        self._started = False
        self._stopped = False
        #: The data path may take its fast way: running, no fatal error, no dead or returning peer.
        self.healthy = False

    # --------------------------------------------------------------- bring-up
    def start(self) -> None:
        """Join the mesh; return once every node of the group is connected.

        Raises:
            ConfigError: the scheduler refused the registration (rank, size, version).
            TimeoutError: the mesh was not complete within ``init_timeout_ms``.
            PeerError: the scheduler or a peer went away during bring-up.
        """
        if self._started:
            return
        self._started = True
        cfg = self.config
        deadline = time.monotonic() + cfg.init_timeout_ms / 1000
        if cfg.bind_cpu_core:
            self._bind_core()
        if cfg.backend not in (None, "cpu"):  # as StepMesh's init: cudaSetDevice(STEPMESH_GPU)
            from ..backends import select

            select(cfg.backend).set_device(cfg.gpu)
        options = {**self.data_options, **cfg.ucx_options()}
        self.data = Transport(
            options, cfg.progress or "blocking",
            lane_options={**options, **self.lane_options} if self.config.lane_on() else None,
            memory_hints=cfg.memory_hints, one_sided=True,
        )
        self._control = Transport({}, "blocking", active_messages=True)
        self._loop = EventLoop(self._control, self._waker)
        self._running = True
        try:
            self._connect_scheduler(deadline)
        except BaseException:
            self._teardown()  # nothing may stay open when init() fails
            raise
        self._thread = threading.Thread(target=self._run, name=f"stepmesh-{self.role}-control", daemon=True)
        self._thread.start()
        try:
            self._register(deadline)
            self._connect_peers(deadline)
            assert self._welcome is not None
            if not self._welcome.code:  # a rejoining node finds the others past that barrier
                self.barrier(True, True, False, _deadline=deadline, _what="the init barrier")
        except BaseException:
            self._teardown()
            raise
        self._update_health()
        log.info("%s rank %d of group %d joined (node %d)", self.role, self.rank, self.group, self.node_id)

    def _bind_core(self) -> None:
        """Pin the calling thread to core ``STEPMESH_CPU_START_OFFSET`` (modulo the cores it may use).

        Threads it starts later inherit the pin; the control thread undoes it for
        itself (see ``_run``), so that its heartbeats never take the core of a
        busy-polling caller.
        """
        allowed = sorted(os.sched_getaffinity(0))
        core = allowed[self.config.cpu_start_offset % len(allowed)]
        os.sched_setaffinity(0, {core})
        self._unpinned = set(allowed)
        log.info("%s bound to CPU core %d", self.role, core)

    def _connect_scheduler(self, deadline: float) -> None:
        """Connect and register, retrying while the scheduler is not up yet."""
        cfg = self.config
        assert self._control is not None and self.data is not None
        reg = P.Registration(
            version=__version__,
            role=P.Role.parse(self.role),
            rank=self.rank,
            group=self.group,
            gpu=cfg.gpu,
            pid=os.getpid(),
            host=cfg.node_host or socket.gethostname(),
            address=self.data.address,
            num_workers=cfg.num_workers,
            num_servers=cfg.num_servers,
            group_size=cfg.group_size,
            topology=cfg.topology,
            lane_address=self.data.lane_address,
        )
        message = self._register_message = P.encode_register(reg)
        last_error = "no answer"
        while True:
            try:
                # A plain TCP probe first: UCX logs an ERROR line for every refused
                # attempt, and a node often starts before its scheduler.
                socket.create_connection((cfg.root_uri, cfg.root_port or 0), timeout=_CONNECT_RETRY_S).close()
            except OSError as e:
                last_error = f"{e.strerror or e} (TCP)"
            else:
                last_error = self._try_scheduler(message, deadline)
                if self._channel is not None:
                    return
            if time.monotonic() + _CONNECT_RETRY_S >= deadline:
                raise TimeoutError(
                    f"{self.role}: cannot reach the scheduler at {cfg.root_uri}:{cfg.root_port} "
                    f"(DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT) within {cfg.init_timeout_ms} ms: {last_error}; "
                    "is it running there? (it exits once every node of the mesh has stopped)"
                )
            time.sleep(_CONNECT_RETRY_S)

    def _try_scheduler(self, message: bytes, deadline: float) -> str:
        """One attempt to connect to the scheduler and deliver ``message``; why it failed, if it did."""
        cfg = self.config
        assert self._control is not None
        deadline = min(deadline, time.monotonic() + 2.0)
        try:
            ep = self._control.connect_listener(cfg.root_uri, cfg.root_port or 0)
            channel = ControlChannel(self._control, ep)
            channel.send(message)
            # Wait until the registration is delivered or the connection fails.
            while channel.alive and not channel.flushed and time.monotonic() < deadline:
                self._loop.run_once(0.02)  # type: ignore[union-attr]
            if channel.alive and channel.flushed:
                self._channel = channel
                self._last_heard = time.monotonic()
                return ""
            channel.close()
            return "connection refused or reset"
        except Exception as e:  # UCX raises its own errors for unreachable hosts
            return str(e)

    def _register(self, deadline: float) -> None:
        cfg = self.config
        self._wait_for(lambda: self._welcome is not None, deadline, "the scheduler's welcome")
        assert self._welcome is not None
        self.node_id = self._welcome.node_id
        self.rank = self._welcome.rank
        # The scheduler times the mesh out itself and says who is missing; give
        # its verdict a moment to arrive before falling back to our own.
        self._wait_for(
            lambda: self._book is not None,
            deadline + _VERDICT_GRACE_S,
            f"the rest of the mesh ({cfg.num_workers} workers x {cfg.num_servers} servers "
            f"x {cfg.group_size} groups) to register",
        )
        assert self._book is not None
        order = {P.Role.SERVER: 0, P.Role.WORKER: 1}
        self.peers = sorted(self._book.peers, key=lambda p: (order[p.role], p.group, p.rank))

    def _connect_peers(self, deadline: float) -> None:
        """Endpoints to every peer from its worker address, then one ping each way on each path."""
        data = self.data
        assert data is not None
        pings = []
        for peer in self.peers:
            self._connect(peer)
            pings.append(self._ping(peer))
        ok = data.progress_until(lambda: all(w.completed for w in pings), deadline, self.check_alive)
        if not ok:
            missing = [w.describe_missing() for w in pings if not w.completed]
            raise TimeoutError(f"{self.role}: no wire-up from {', '.join(missing)}")
        for wireup in pings:
            wireup.check()

    def _connect(self, peer: P.Peer) -> None:
        """Endpoints to ``peer``'s data worker, and to its lane when both sides have one."""
        data = self.data
        assert data is not None
        self.endpoints[peer.node_id] = data.connect(peer.address)
        self.lane_endpoints.pop(peer.node_id, None)
        if data.has_lane and peer.lane_address:
            self.lane_endpoints[peer.node_id] = data.connect_lane(peer.lane_address)

    def _ping(self, peer: P.Peer) -> _Wireup:
        """One wire-up message each way with ``peer`` on the data worker, and on the lane when there is one."""
        data = self.data
        assert data is not None
        wireup = _Wireup(peer, np.array([self.node_id], dtype=np.uint64))
        ucp = data.ucp  # the data path's own tag calls: the wire-up proves them too
        paths = [("data path", self.endpoints[peer.node_id], False)]
        if peer.node_id in self.lane_endpoints:
            paths.append(("device lane", self.lane_endpoints[peer.node_id], True))
        for path, endpoint, lane in paths:
            echo = np.zeros(1, dtype=np.uint64)
            recv = ucp.recv(echo.ctypes.data, echo.nbytes, self.wireup_tag(peer.node_id), lane=lane)
            send = ucp.send(endpoint.handle, wireup.token.ctypes.data, wireup.token.nbytes, self.wireup_tag(self.node_id))
            wireup.paths.append((path, recv, send, echo))
        return wireup

    # ---------------------------------------------------------- control loop
    def _run(self) -> None:
        if self._unpinned:  # this thread only (pid 0 is the calling thread)
            os.sched_setaffinity(0, self._unpinned)
        cfg = self.config
        interval = cfg.heartbeat_interval_ms / 1000
        limit = cfg.heartbeat_timeout_ms / 1000
        next_beat = 0.0
        assert self._loop is not None and self._channel is not None
        while self._running:
            self._loop.run_once(interval / 2)
            channel = self._channel
            for data in channel.poll():
                try:
                    self._handle(P.decode_control(data))
                except ProtocolError as e:
                    self._fail(ProtocolError(f"bad message from the scheduler: {e}"))
            now = time.monotonic()
            if not channel.alive:
                if self._running:
                    self._fail(PeerError("lost the connection to the scheduler", "scheduler", 0))
                break
            if now - self._last_heard > limit:
                self._fail(
                    PeerError(
                        f"the scheduler sent no heartbeat for {cfg.heartbeat_timeout_ms} ms",
                        "scheduler",
                        0,
                    )
                )
                break
            if now >= next_beat:
                next_beat = now + interval
                try:
                    channel.send(P.encode_heartbeat())
                except PeerError:
                    pass

    def _handle(self, msg: P.Control) -> None:
        self._last_heard = time.monotonic()
        with self._lock:
            if msg.kind is P.Msg.WELCOME:
                problem = self._check_scheduler_proof(msg.blob)
                if problem is None:
                    self._welcome = msg
                else:
                    self._fatal = self._fatal or AuthError(problem)
            elif msg.kind is P.Msg.BOOK:
                self._book = msg
            elif msg.kind is P.Msg.RELEASE:
                self._releases[(msg.scope, msg.seq)] = msg
            elif msg.kind is P.Msg.PEER_BACK:
                self._returned.extend(msg.peers)  # applied by the caller's thread: _reconnect()
            elif msg.kind is P.Msg.PEER_DEAD:
                self.dead[msg.node_id] = msg.text
                self.on_peer_dead(msg.node_id, msg.text)
            elif msg.kind is P.Msg.STOPPING:
                self.stopping.add(msg.node_id)
            elif msg.kind is P.Msg.CHALLENGE:
                token = self.config.auth_token
                if token is None:
                    self._fatal = self._fatal or AuthError(
                        "the scheduler requires authentication: set STEPMESH_AUTH_TOKEN to the mesh's token"
                    )
                else:
                    self._challenge = msg.blob
                    self._send_control(
                        P.encode_proof(P.auth_proof(token, msg.blob, self._register_message), self._auth_nonce)
                    )
            elif msg.kind is P.Msg.ERROR:
                if self._fatal is None:
                    self._fatal = _ERRORS.get(msg.code, StepMeshError)(f"scheduler: {msg.text}")
            elif msg.kind is not P.Msg.HEARTBEAT:
                log.warning("ignoring unexpected %s from the scheduler", msg.kind.name)
            if msg.kind is not P.Msg.HEARTBEAT and msg.kind is not P.Msg.STOPPING:
                self._update_health()
            self._lock.notify_all()

    def _check_scheduler_proof(self, proof: bytes) -> str | None:
        """With a token, the scheduler must have challenged us and proved it knows the token too."""
        token = self.config.auth_token
        if token is None:
            return None
        if self._challenge is None:
            return (
                "the scheduler did not ask for the authentication token: it is not started with "
                "STEPMESH_AUTH_TOKEN (or is not the mesh's scheduler); refusing to join"
            )
        if not hmac.compare_digest(proof, P.scheduler_proof(token, self._auth_nonce, self._challenge)):
            return "the scheduler could not prove it knows STEPMESH_AUTH_TOKEN; refusing to join"
        return None

    def on_peer_dead(self, node_id: int, text: str) -> None:
        """Hook for subclasses: a node of the mesh died (called on the control thread)."""

    def _reconnect(self) -> None:
        """Connect to peers that rejoined (on the caller's thread, which owns the data path)."""
        data = self.data
        assert data is not None
        with self._lock:
            back, self._returned = self._returned, []
        self._wireups = [w for w in self._wireups if not w.completed]
        for peer in back:
            self._connect(peer)
            self._wireups.append(self._ping(peer))  # the rejoining node waits for it
            self.peers = [peer if p.node_id == peer.node_id else p for p in self.peers]
            self.dead.pop(peer.node_id, None)
            log.warning("%s rank %d: %s is back, reconnected", self.role, self.rank, peer.describe())
            self.on_peer_back(peer)
        self._update_health()

    def on_peer_back(self, peer: P.Peer) -> None:
        """Hook for subclasses: a dead peer rejoined and is connected again."""

    def keep_moving(self) -> None:
        """Hook for subclasses: move what the data path holds back (called while a barrier waits)."""

    def _update_health(self) -> None:
        self.healthy = (
            self._started and not self._stopped and self._fatal is None and not self.dead and not self._returned
        )

    def _fail(self, error: StepMeshError) -> None:
        with self._lock:
            if self._fatal is None:
                self._fatal = error
            self.healthy = False
            self._lock.notify_all()

    def check_alive(self) -> None:
        """Raise the mesh's fatal error, if any (scheduler lost, registration refused).

        Raises:
            StepMeshError: the error that ended this node's membership.
        """
        if self._fatal is not None:
            raise self._fatal

    def _wait_for(self, cond: Any, deadline: float, what: str) -> None:
        with self._lock:
            while not cond():
                self.check_alive()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.role} rank {self.rank}: timed out waiting for {what}")
                self._lock.wait(min(left, 0.5))

    def _send_control(self, data: bytes) -> None:
        assert self._channel is not None
        self._channel.send(data)
        self._waker.wake()

    # ---------------------------------------------------------------- public
    @property
    def info(self) -> NodeInfo:
        """Role, rank, group and the numbers of peers of this node (once started)."""
        workers = sum(p.role is P.Role.WORKER for p in self.peers) if self.role == "server" else 0
        servers = sum(p.role is P.Role.SERVER for p in self.peers) if self.role == "worker" else 0
        cfg = self.config
        return NodeInfo(
            self.role, self.rank, self.group, cfg.group_size,
            workers or cfg.num_workers, servers or cfg.num_servers, self.node_id,
        )

    def barrier(
        self,
        include_server: bool = True,
        include_worker: bool = True,
        instance_barrier: bool = True,
        timeout_ms: int | None = None,
        *,
        _deadline: float | None = None,
        _what: str = "a barrier",
    ) -> None:
        """Wait until every server and/or worker reaches the same barrier.

        With ``instance_barrier`` (StepMesh's default) the barrier spans every
        instance group; without it, only this node's group. A node whose own
        role is not included is no member of that barrier and returns at once
        (as in ps-lite, where only the group's members count).

        Raises:
            ArgumentError: ``instance_barrier`` is not a bool (StepMesh's third argument; ``timeout_ms`` is the fourth).
            TimeoutError: not every node arrived within ``timeout_ms``
                (default ``STEPMESH_BARRIER_TIMEOUT_MS``).
            PeerError: a participant or the scheduler died.
        """
        if not isinstance(instance_barrier, (bool, np.bool_)):
            raise ArgumentError(
                f"barrier(): instance_barrier must be a bool, got {instance_barrier!r} "
                "(pass timeout_ms by keyword: barrier(timeout_ms=...))"
            )
        scope = (P.SCOPE_SERVERS if include_server else 0) | (P.SCOPE_WORKERS if include_worker else 0)
        if instance_barrier and self.config.group_size > 1:
            scope |= P.SCOPE_EVERY_GROUP
        mine = P.SCOPE_SERVERS if self.role == "server" else P.SCOPE_WORKERS
        if not scope & mine:
            return
        self._barrier(scope, _deadline, self.config.barrier_timeout_ms if timeout_ms is None else timeout_ms, _what)

    def _barrier(
        self, scope: int, deadline: float | None, timeout_ms: int, what: str, progress_data: bool = False
    ) -> None:
        if self._channel is None or self._stopped:
            raise StepMeshError(f"{self.role} is not running: call init() first")
        if deadline is None:
            deadline = time.monotonic() + timeout_ms / 1000
        seq = self._barrier_seq.get(scope, 0)
        self._barrier_seq[scope] = seq + 1
        self._send_control(P.encode_barrier(seq, scope))
        def released() -> bool:
            return (scope, seq) in self._releases

        if progress_data and self.data is not None:
            # Keep the data path moving: a peer may still be reading our last answer,
            # and answers held back for their stream event still have to leave.
            def done() -> bool:
                self.keep_moving()
                return released()

            if not self.data.progress_until(done, deadline, self.check_alive, slice_ms=5):
                raise TimeoutError(f"{self.role} rank {self.rank}: timed out waiting for {what}")
        else:
            self._wait_for(released, deadline, what)
        release = self._releases.pop((scope, seq))
        if release.code:
            raise _ERRORS.get(release.code, StepMeshError)(f"{what}: {release.text}")

    def stop(self) -> None:
        """Global barrier of every node (and the scheduler), then tear down. Idempotent.

        Raises:
            TimeoutError: the other nodes did not all stop within ``stop_timeout_ms``.
        """
        if self._stopped or not self._started:
            return
        try:
            if self._channel is not None and self._fatal is None:
                self._barrier(P.SCOPE_STOP, None, self.config.stop_timeout_ms, "the stop barrier", progress_data=True)
        finally:
            self._teardown()

    def _teardown(self) -> None:
        self._stopped = True
        self.healthy = False
        self._running = False
        self._waker.wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        if self._channel is not None:
            self._channel.close(hang_up=self._fatal is None)  # the scheduler waits for this after the stop barrier
        self.endpoints.clear()
        self.lane_endpoints.clear()
        if self.data is not None:
            self.data.close()
        if self._loop is not None:
            self._loop.close()
        self._waker.close()
