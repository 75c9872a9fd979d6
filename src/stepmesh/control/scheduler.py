"""The scheduler: registrations, rank assignment, address books, barriers, liveness.

One per mesh. It listens on a UCX listener at ``DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT``
(TCP, UCX error handling on), and serves every instance group. Its event loop runs
in a background thread and sleeps in epoll while nothing happens.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .._version import __version__
from ..config import Config
from ..errors import ConfigError, PeerError, ProtocolError, StepMeshError, TimeoutError
from . import messages as P
from .transport import ControlChannel, EventLoop, Transport, Waker

__all__ = ["Scheduler"]

log = logging.getLogger("stepmesh.scheduler")
_STOP_LINGER_S = 5.0  # after the stop barrier: how long the nodes have to hang up before the scheduler does


@dataclass(eq=False)
class _Conn:
    channel: ControlChannel
    opened: float
    node: _Node | None = None
    rejected: bool = False
    pending: tuple[P.Registration, bytes, bytes] | None = None  # registration, its bytes, nonce
    proof: bytes = b""  # the scheduler's own proof of the token, for the node's WELCOME


@dataclass(eq=False)
class _Node:
    node_id: int
    reg: P.Registration
    rank: int
    conn: _Conn
    last_seen: float
    alive: bool = True
    booked: bool = False

    @property
    def peer(self) -> P.Peer:
        r = self.reg
        return P.Peer(self.node_id, r.role, self.rank, r.group, r.host, r.address, r.lane_address)

    def describe(self) -> str:
        return f"{self.reg.role.label} rank {self.rank} of group {self.reg.group} (pid {self.reg.pid} on {self.reg.host})"


@dataclass
class _Barrier:
    arrived: set[int] = field(default_factory=set)


class Scheduler:
    """The mesh's scheduler.

    Args:
        config: its configuration; ``Config.from_env(role="scheduler")`` when None.

    Use ``start()`` then ``stop()`` (what ``stepmesh.init()``/``stepmesh.stop()``
    do for ``DMLC_ROLE=scheduler``), or :meth:`serve` for both.
    """

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else Config.from_env(role="scheduler")
        if self.config.root_port is None:
            raise ConfigError(
                "DMLC_PS_ROOT_PORT (root_port) is not set: the scheduler needs a port "
                "(0 picks a free one)"
            )
        c = self.config
        self._expected_per_group = c.num_workers + c.num_servers
        self._conns: list[_Conn] = []
        self._nodes: dict[int, _Node] = {}
        self._by_key: dict[tuple[P.Role, int, int], _Node] = {}
        self._barriers: dict[tuple[int, int, int], _Barrier] = {}
        self._next_id = 1
        self._first_seen: float | None = None
        self._stop_requested = False
        self._stop_passed = False
        self._gave_up_waiting = False  # the init timeout passed with nodes missing: the stop barrier no longer waits
        self._failed: StepMeshError | None = None
        self._done = threading.Event()
        self._waker = Waker()
        self._thread: threading.Thread | None = None
        self._transport: Transport | None = None
        self._listener: Any = None
        self.port: int | None = None

    # ------------------------------------------------------------------ public
    def start(self) -> int:
        """Listen and serve in a background thread; returns the port listened on.

        Raises:
            StepMeshError: the listener could not be created (port in use, say).
        """
        if self._thread is not None:
            return self.port or 0
        self._transport = Transport({}, "blocking", active_messages=True)
        try:
            self._listener = self._transport.listen(self.config.root_port or 0, self._on_endpoint)
        except Exception as e:
            raise StepMeshError(
                f"scheduler cannot listen on port {self.config.root_port} "
                f"(DMLC_PS_ROOT_PORT): {e}"
            ) from e
        self.port = int(self._listener.port)
        # The init timeout runs from here: a scheduler nobody joins fails clearly
        # instead of waiting forever (raise STEPMESH_INIT_TIMEOUT_MS to wait longer).
        self._first_seen = time.monotonic()
        self._loop = EventLoop(self._transport, self._waker)
        self._thread = threading.Thread(target=self._run, name="stepmesh-scheduler", daemon=True)
        self._thread.start()
        log.info("scheduler listening on port %d", self.port)
        return self.port

    def stop(self, timeout_ms: int | None = None) -> None:
        """Join the global stop barrier: return once every live node has called ``stop()``.

        Args:
            timeout_ms: bound on the wait; None waits as long as the nodes are alive
                (a dead node is dropped from the barrier after its heartbeat timeout).

        Raises:
            TimeoutError: ``timeout_ms`` passed first.
            StepMeshError: the mesh failed (incomplete at the init timeout, say).
        """
        if self._thread is None:
            return
        self._stop_requested = True
        self._waker.wake()
        ok = self._done.wait(None if timeout_ms is None else timeout_ms / 1000)
        if not ok:
            self._done.set()
            self._waker.wake()
            self._thread.join(timeout=5)
            self._thread = None
            raise TimeoutError(
                f"scheduler stop: nodes still running after {timeout_ms} ms: "
                + ", ".join(n.describe() for n in self._nodes.values() if n.alive)
            )
        self._thread.join(timeout=5)
        self._thread = None
        if self._failed is not None:
            raise self._failed

    def serve(self) -> None:
        """``start()`` then ``stop()``: serve one mesh from bring-up to shutdown."""
        self.start()
        self.stop()

    # ------------------------------------------------------------- event loop
    def _on_endpoint(self, endpoint: Any) -> None:
        assert self._transport is not None
        self._conns.append(_Conn(ControlChannel(self._transport, endpoint), time.monotonic()))

    def _run(self) -> None:
        interval = self.config.heartbeat_interval_ms / 1000
        next_check = 0.0
        try:
            while not self._done.is_set():
                self._loop.run_once(interval / 2)
                for conn in list(self._conns):
                    for data in conn.channel.poll():
                        self._handle(conn, data)
                    if not conn.channel.alive:
                        self._lost(conn, "its control connection closed")
                now = time.monotonic()
                if now >= next_check:
                    next_check = now + interval / 2
                    self._check_liveness(now)
                    self._check_init_timeout(now)
                if self._stop_requested:
                    self._try_stop()
        except Exception as e:  # never leave stop() waiting on a dead thread
            log.exception("scheduler loop failed")
            self._failed = e if isinstance(e, StepMeshError) else StepMeshError(f"scheduler failed: {e}")
            self._done.set()
        finally:
            if self._done.is_set():
                self._drain_and_close()

    def _handle(self, conn: _Conn, data: bytes) -> None:
        if conn.rejected:
            return
        try:
            msg = P.decode_control(data)
        except ProtocolError as e:
            log.warning("dropping a connection that sent a bad message: %s", e)
            self._reject(conn, P.ErrorCode.PROTOCOL, str(e))
            return
        node = conn.node
        if msg.kind is P.Msg.REGISTER:
            if node is not None or conn.pending is not None:
                self._reject(conn, P.ErrorCode.PROTOCOL, "registered twice on one connection")
                return
            assert msg.registration is not None
            if self.config.auth_token is None:
                self._register(conn, msg.registration)
            else:  # nothing about the mesh is told before the node proves it knows the token
                nonce = os.urandom(P.AUTH_NONCE_BYTES)
                conn.pending = (msg.registration, bytes(data), nonce)
                conn.channel.send(P.encode_challenge(nonce))
            return
        if msg.kind is P.Msg.PROOF and node is None and conn.pending is not None:
            reg, message, nonce = conn.pending
            conn.pending = None
            expected = P.auth_proof(self.config.auth_token or "", nonce, message)
            if hmac.compare_digest(expected, msg.blob) and len(msg.nonce) == P.AUTH_NONCE_BYTES:
                conn.proof = P.scheduler_proof(self.config.auth_token or "", msg.nonce, nonce)
                self._register(conn, reg)
            else:
                log.warning("refusing %s from pid %d on %s: wrong authentication token", reg.role.label, reg.pid, reg.host)
                self._reject(conn, P.ErrorCode.AUTH, "authentication failed: STEPMESH_AUTH_TOKEN does not match")
            return
        if node is None:
            if msg.kind is P.Msg.HEARTBEAT and conn.pending is not None:
                return  # still proving itself
            self._reject(conn, P.ErrorCode.PROTOCOL, f"{msg.kind.name} before REGISTER")
            return
        node.last_seen = time.monotonic()
        if msg.kind is P.Msg.HEARTBEAT:
            self._send(node, P.encode_heartbeat())
        elif msg.kind is P.Msg.BARRIER:
            self._arrive(node, msg.seq, msg.scope)
        else:
            log.warning("ignoring unexpected %s from %s", msg.kind.name, node.describe())

    # ----------------------------------------------------------- registration
    def _register(self, conn: _Conn, reg: P.Registration) -> None:
        now = time.monotonic()
        error = self._validate(reg)
        if error is None:
            rank = reg.rank if reg.rank >= 0 else self._free_rank(reg.role, reg.group)
            if rank is None:
                error = (
                    f"the mesh is full: group {reg.group} already has "
                    f"{self._role_count(reg.role)} {reg.role.label}s "
                    f"(DMLC_NUM_{'WORKER' if reg.role is P.Role.WORKER else 'SERVER'}="
                    f"{self._role_count(reg.role)})"
                )
            elif (reg.role, reg.group, rank) in self._by_key and not self._may_rejoin(reg.role, reg.group, rank):
                other = self._by_key[(reg.role, reg.group, rank)]
                error = (
                    f"duplicate rank: {reg.role.label} rank {rank} of group {reg.group} "
                    f"is already registered by pid {other.reg.pid} on {other.reg.host} "
                    "(check DMLC_NODE_RANK)"
                )
        if error is not None:
            log.warning("rejecting %s from pid %d: %s", reg.role.label, reg.pid, error)
            self._reject(conn, P.ErrorCode.CONFIG, error)
            return
        assert rank is not None  # every refusal above returned
        if (reg.role, reg.group, rank) in self._by_key:  # a dead server comes back
            self._rejoin(conn, reg, rank, now)
            return
        node = _Node(self._next_id, reg, rank, conn, now)
        self._next_id += 1
        conn.node = node
        self._nodes[node.node_id] = node
        self._by_key[(reg.role, reg.group, rank)] = node
        self._send(node, P.encode_welcome(node.node_id, rank, proof=conn.proof))
        log.info("registered %s as node %d", node.describe(), node.node_id)
        self._maybe_send_books()
        for key in [k for k in self._barriers if k[0] & P.SCOPE_EVERY_GROUP]:
            self._settle(key, node)

    def _may_rejoin(self, role: P.Role, group: int, rank: int) -> bool:
        """A server that died after the mesh formed may register again under its rank."""
        old = self._by_key[(role, group, rank)]
        return role is P.Role.SERVER and not old.alive and old.booked and not self._stop_passed

    def _rejoin(self, conn: _Conn, reg: P.Registration, rank: int, now: float) -> None:
        old = self._by_key[(reg.role, reg.group, rank)]
        node = _Node(old.node_id, reg, rank, conn, now)  # same node id: the peers' tags stay valid
        node.booked = True
        conn.node = node
        self._nodes[node.node_id] = node
        self._by_key[(reg.role, reg.group, rank)] = node
        group = None if self.config.topology == "full" else reg.group
        peers = [n for n in self._group_nodes(group) if n.alive and n.reg.role is not reg.role]
        self._send(node, P.encode_welcome(node.node_id, rank, rejoin=True, proof=conn.proof))
        self._send(node, P.encode_book([n.peer for n in peers]))
        for n in peers:
            self._send(n, P.encode_book([node.peer], P.Msg.PEER_BACK))
        log.warning("%s rejoined as node %d", node.describe(), node.node_id)

    def _role_count(self, role: P.Role) -> int:
        return self.config.num_workers if role is P.Role.WORKER else self.config.num_servers

    def _validate(self, reg: P.Registration) -> str | None:
        c = self.config
        if reg.version.split(".")[:2] != __version__.split(".")[:2]:
            return f"version mismatch: node runs stepmesh {reg.version}, scheduler {__version__}"
        if reg.role is P.Role.SCHEDULER:
            return "a second scheduler tried to register"
        mine = (c.num_workers, c.num_servers, c.group_size, c.topology)
        theirs = (reg.num_workers, reg.num_servers, reg.group_size, reg.topology)
        if mine != theirs:
            return (
                "mesh shape mismatch: node has DMLC_NUM_WORKER/DMLC_NUM_SERVER/"
                f"DMLC_GROUP_SIZE/STEPMESH_TOPOLOGY = {theirs}, scheduler has {mine}"
            )
        if reg.group >= c.group_size:
            return (
                f"group {reg.group} (STEPMESH_GPU + DMLC_RANK_OFFSET) is out of range: "
                f"DMLC_GROUP_SIZE={c.group_size}"
            )
        if reg.rank >= self._role_count(reg.role):
            return (
                f"rank {reg.rank} (DMLC_NODE_RANK) is out of range for a {reg.role.label}: "
                f"expected 0..{self._role_count(reg.role) - 1}"
            )
        if len(self._nodes) >= c.expected_nodes and reg.rank < 0:
            return f"the mesh is full: all {c.expected_nodes} nodes are registered"
        return None

    def _free_rank(self, role: P.Role, group: int) -> int | None:
        for rank in range(self._role_count(role)):
            if (role, group, rank) not in self._by_key:
                return rank
        return None

    def _group_nodes(self, group: int | None) -> list[_Node]:
        """Nodes of one instance group (all nodes when group is None), rank ordered."""
        nodes = [n for n in self._nodes.values() if group is None or n.reg.group == group]
        return sorted(nodes, key=lambda n: (n.reg.role, n.reg.group, n.rank))

    def _maybe_send_books(self) -> None:
        c = self.config
        if c.topology == "full":
            if len(self._nodes) == c.expected_nodes:
                self._send_books(self._group_nodes(None))
            return
        for g in range(c.group_size):
            nodes = self._group_nodes(g)
            if len(nodes) == self._expected_per_group and not all(n.booked for n in nodes):
                self._send_books(nodes)

    def _send_books(self, nodes: list[_Node]) -> None:
        for node in nodes:
            if node.booked:
                continue
            peers = [n.peer for n in nodes if n.reg.role is not node.reg.role]
            self._send(node, P.encode_book(peers))
            node.booked = True
        log.info("address books sent to %d nodes", len(nodes))

    def _missing(self) -> list[str]:
        c = self.config
        out = []
        for g in range(c.group_size):
            for role in (P.Role.SERVER, P.Role.WORKER):
                for rank in range(self._role_count(role)):
                    if (role, g, rank) not in self._by_key:
                        out.append(f"{role.label} rank {rank} of group {g}")
        return out

    def _check_init_timeout(self, now: float) -> None:
        if self._first_seen is None or all(n.booked for n in self._nodes.values()) and not self._missing():
            return
        waited = now - self._first_seen
        if waited * 1000 < self.config.init_timeout_ms:
            return
        missing = self._missing()
        text = (
            f"the mesh did not complete within {self.config.init_timeout_ms} ms "
            f"(STEPMESH_INIT_TIMEOUT_MS): {len(self._nodes)} of {self.config.expected_nodes} "
            f"nodes registered; missing: {', '.join(missing[:16])}"
            + (f" and {len(missing) - 16} more" if len(missing) > 16 else "")
        )
        log.error("%s", text)
        for node in self._nodes.values():
            if node.alive and not node.booked:
                self._send(node, P.encode_error(P.ErrorCode.TIMEOUT, text))
        if not any(n.booked for n in self._nodes.values()):
            self._failed = TimeoutError(text)
            self._done.set()
        else:
            self._first_seen = None  # the booked groups run on; report once
            self._gave_up_waiting = True

    # ---------------------------------------------------------------- barriers
    def _participants(self, node: _Node, scope: int) -> list[_Node]:
        if scope & P.SCOPE_STOP:
            return [n for n in self._nodes.values() if n.alive]
        roles = set()
        if scope & P.SCOPE_SERVERS:
            roles.add(P.Role.SERVER)
        if scope & P.SCOPE_WORKERS:
            roles.add(P.Role.WORKER)
        group = None if self.config.topology == "full" or scope & P.SCOPE_EVERY_GROUP else node.reg.group
        return [n for n in self._group_nodes(group) if n.reg.role in roles]

    def _barrier_key(self, node: _Node, seq: int, scope: int) -> tuple[int, int, int]:
        group = -1 if scope & (P.SCOPE_STOP | P.SCOPE_EVERY_GROUP) or self.config.topology == "full" else node.reg.group
        return (scope, group, seq)

    def _arrive(self, node: _Node, seq: int, scope: int) -> None:
        if scope & P.SCOPE_STOP:
            scope = P.SCOPE_STOP
            for other in self._nodes.values():  # a server learns that a worker will send nothing more
                if other.alive and other is not node:
                    self._send(other, P.encode_stopping(node.node_id))
        elif scope & (P.SCOPE_SERVERS | P.SCOPE_WORKERS) == 0:
            self._send(node, P.encode_release(seq, scope))
            return
        key = self._barrier_key(node, seq, scope)
        self._barriers.setdefault(key, _Barrier()).arrived.add(node.node_id)
        self._settle(key, node)

    def _settle(self, key: tuple[int, int, int], node: _Node) -> None:
        scope, _, seq = key
        barrier = self._barriers[key]
        members = self._participants(node, scope)
        dead = [n for n in members if not n.alive]
        if dead and not scope & P.SCOPE_STOP:
            text = f"barrier failed: {dead[0].describe()} died"
            for n in members:
                if n.alive and n.node_id in barrier.arrived:
                    self._send(n, P.encode_release(seq, scope, P.ErrorCode.PEER, text))
            del self._barriers[key]
            return
        if scope & P.SCOPE_STOP and (not self._stop_requested or (not self._gave_up_waiting and self._missing())):
            return  # every node the mesh expects stops together: a late instance group is waited for
        if scope & P.SCOPE_EVERY_GROUP and not self._gave_up_waiting and self._missing():
            return  # a barrier of every instance group waits for the groups not registered yet
        if all(n.node_id in barrier.arrived for n in members):
            for n in members:
                self._send(n, P.encode_release(seq, scope))
            del self._barriers[key]
            if scope & P.SCOPE_STOP:
                self._stop_passed = True

    def _try_stop(self) -> None:
        for key in [k for k in self._barriers if k[0] & P.SCOPE_STOP]:
            self._settle(key, next(iter(self._nodes.values())))
        if self._stop_passed:
            self._done.set()
        elif self._nodes and not any(n.alive for n in self._nodes.values()):
            self._failed = PeerError("every node of the mesh died before stop()")
            self._done.set()

    # ---------------------------------------------------------------- liveness
    def _check_liveness(self, now: float) -> None:
        limit = self.config.heartbeat_timeout_ms / 1000
        for node in list(self._nodes.values()):
            if node.alive and now - node.last_seen > limit:
                self._declare_dead(node, f"no heartbeat for {self.config.heartbeat_timeout_ms} ms")

    def _lost(self, conn: _Conn, why: str) -> None:
        self._conns.remove(conn)
        conn.channel.close()
        if conn.node is not None and conn.node.alive:
            if self._stop_passed:
                conn.node.alive = False
            else:
                self._declare_dead(conn.node, why)

    def _declare_dead(self, node: _Node, why: str) -> None:
        node.alive = False
        text = f"{node.describe()} is gone: {why}"
        log.warning("%s", text)
        for other in self._nodes.values():
            if other.alive:
                self._send(other, P.encode_peer_dead(node.node_id, node.reg.role, node.rank, text))
        for key in list(self._barriers):
            self._settle(key, node)

    # ------------------------------------------------------------------ output
    def _send(self, node: _Node, data: bytes) -> None:
        try:
            node.conn.channel.send(data)
        except PeerError:
            pass

    def _reject(self, conn: _Conn, code: P.ErrorCode, text: str) -> None:
        conn.rejected = True
        try:
            conn.channel.send(P.encode_error(code, text))
        except PeerError:
            pass

    def _drain_and_close(self) -> None:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not all(c.channel.flushed for c in self._conns):
            self._loop.run_once(0.01)
        if self._stop_passed:
            # A release handed to UCX is not yet a release read: closing now can reach a node
            # before its last message does ("lost the connection" in the stop barrier). Each
            # node hangs up once released; wait for that, within a bound.
            deadline = time.monotonic() + _STOP_LINGER_S
            while time.monotonic() < deadline and any(c.channel.alive for c in self._conns):
                self._loop.run_once(0.01)
                for c in self._conns:
                    c.channel.poll()
        self._shutdown()

    def _shutdown(self) -> None:
        self._done.set()
        for conn in self._conns:
            conn.channel.close()
        self._conns.clear()
        self._listener = None
