"""The control plane's wire format: messages between the nodes and the scheduler.

Everything is packed with :mod:`struct` (little endian), never pickled, and
decoded defensively: every length is checked against the bytes present and
against a limit before it is used, and any violation is a ``ProtocolError``.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass, field
from enum import IntEnum

from ..errors import ProtocolError

PROTOCOL_VERSION = 4  # 4: the lane address; 3: STOPPING; 2: PROOF carries the node's nonce, WELCOME the scheduler's proof
CONTROL_MAGIC = b"SMC1"
MAX_CONTROL_BYTES = 1 << 20
MAX_STRING = 4096
MAX_ADDRESS = 16384
MAX_PEERS = 4095

# ------------------------------------------------------------ byte codec
class Writer:
    """Appends little-endian fields to a bytearray."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def u8(self, v: int) -> Writer:
        self.buf += struct.pack("<B", v)
        return self

    def u16(self, v: int) -> Writer:
        self.buf += struct.pack("<H", v)
        return self

    def u32(self, v: int) -> Writer:
        self.buf += struct.pack("<I", v)
        return self

    def i64(self, v: int) -> Writer:
        self.buf += struct.pack("<q", v)
        return self

    def u64(self, v: int) -> Writer:
        self.buf += struct.pack("<Q", v)
        return self

    def blob(self, v: bytes) -> Writer:
        self.buf += struct.pack("<I", len(v))
        self.buf += v
        return self

    def text(self, v: str) -> Writer:
        return self.blob(v.encode("utf-8"))


class Reader:
    """Reads fields back, raising ``ProtocolError`` on any short or oversized field."""

    __slots__ = ("mv", "pos", "what")

    def __init__(self, data: bytes | bytearray | memoryview, what: str) -> None:
        self.mv = memoryview(data).cast("B")
        self.pos = 0
        self.what = what

    def _take(self, fmt: str, size: int) -> int:
        end = self.pos + size
        if end > len(self.mv):
            raise ProtocolError(
                f"truncated {self.what}: needs {end} bytes, has {len(self.mv)}"
            )
        (v,) = struct.unpack_from(fmt, self.mv, self.pos)
        self.pos = end
        return int(v)

    def u8(self) -> int:
        return self._take("<B", 1)

    def u16(self) -> int:
        return self._take("<H", 2)

    def u32(self) -> int:
        return self._take("<I", 4)

    def i64(self) -> int:
        return self._take("<q", 8)

    def u64(self) -> int:
        return self._take("<Q", 8)

    def blob(self, limit: int) -> bytes:
        n = self.u32()
        if n > limit:
            raise ProtocolError(f"{self.what}: field of {n} bytes exceeds the limit of {limit}")
        end = self.pos + n
        if end > len(self.mv):
            raise ProtocolError(f"truncated {self.what}: needs {end} bytes, has {len(self.mv)}")
        v = bytes(self.mv[self.pos : end])
        self.pos = end
        return v

    def text(self, limit: int = MAX_STRING) -> str:
        try:
            return self.blob(limit).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"{self.what}: invalid UTF-8 text") from None

    def done(self) -> None:
        if self.pos != len(self.mv):
            raise ProtocolError(
                f"{self.what}: {len(self.mv) - self.pos} unexpected trailing bytes"
            )


# ----------------------------------------------------------- control plane
class Msg(IntEnum):
    REGISTER = 1  # node -> scheduler
    WELCOME = 2  # scheduler -> node: your node id and rank (with authentication: the scheduler's proof)
    BOOK = 3  # scheduler -> node: the peers to connect to
    BARRIER = 4  # node -> scheduler
    RELEASE = 5  # scheduler -> node: barrier passed
    HEARTBEAT = 6  # both ways
    ERROR = 7  # scheduler -> node: fatal, with a code
    PEER_DEAD = 8  # scheduler -> node
    CHALLENGE = 9  # scheduler -> node: prove you know the token (a fresh nonce)
    PROOF = 10  # node -> scheduler: HMAC-SHA256(token, nonce + the REGISTER message), and the node's own nonce
    PEER_BACK = 11  # scheduler -> node: a dead peer rejoined under its rank, at a new address
    STOPPING = 12  # scheduler -> node: a peer entered stop() (it sends nothing more)


class Role(IntEnum):
    SCHEDULER = 0
    SERVER = 1
    WORKER = 2

    @classmethod
    def parse(cls, name: str) -> Role:
        return cls[name.upper()]

    @property
    def label(self) -> str:
        return self.name.lower()


class ErrorCode(IntEnum):
    CONFIG = 1  # the registration contradicts the mesh (rank, size, version)
    TIMEOUT = 2  # the mesh did not complete in time
    AUTH = 3
    PROTOCOL = 4
    SHUTDOWN = 5  # the scheduler is going away
    PEER = 6  # a node the call depends on died


# Barrier scopes (bit set).
SCOPE_SERVERS = 1
SCOPE_WORKERS = 2
SCOPE_STOP = 4  # the global barrier of stop(): every node, all groups
SCOPE_EVERY_GROUP = 8  # the roles' nodes of every instance group, not only the caller's (StepMesh's instance barrier)


@dataclass(frozen=True)
class Registration:
    version: str
    role: Role
    rank: int  # -1: let the scheduler choose
    group: int
    gpu: int
    pid: int
    host: str
    address: bytes
    num_workers: int
    num_servers: int
    group_size: int
    topology: str
    lane_address: bytes = b""  # the device lane's worker address; empty: the node has no lane


@dataclass(frozen=True)
class Peer:
    node_id: int
    role: Role
    rank: int
    group: int
    host: str
    address: bytes
    lane_address: bytes = b""

    def describe(self) -> str:
        return f"{self.role.label} rank {self.rank} (group {self.group}, {self.host})"


@dataclass(frozen=True)
class Control:
    """A decoded control message; only the fields of its kind are meaningful."""

    kind: Msg
    registration: Registration | None = None
    node_id: int = 0
    rank: int = 0
    seq: int = 0
    scope: int = 0
    code: int = 0
    role: Role = Role.SCHEDULER
    text: str = ""
    peers: tuple[Peer, ...] = field(default_factory=tuple)
    blob: bytes = b""
    nonce: bytes = b""


AUTH_NONCE_BYTES = 32
AUTH_MAC_BYTES = 32


def _mac(token: str, data: bytes) -> bytes:
    return hmac.new(token.encode("utf-8"), data, hashlib.sha256).digest()


def auth_proof(token: str, nonce: bytes, register_message: bytes) -> bytes:
    """What a node sends to prove it knows ``token``; the token itself never travels."""
    return _mac(token, nonce + register_message)


def scheduler_proof(token: str, node_nonce: bytes, scheduler_nonce: bytes) -> bytes:
    """What the scheduler sends back (in WELCOME) to prove it knows ``token`` too."""
    return _mac(token, b"stepmesh-scheduler" + node_nonce + scheduler_nonce)


def encode_challenge(nonce: bytes) -> bytes:
    return bytes(_start(Msg.CHALLENGE).blob(nonce).buf)


def encode_proof(mac: bytes, node_nonce: bytes) -> bytes:
    """The node's proof, and its own nonce for the scheduler to prove itself in turn."""
    return bytes(_start(Msg.PROOF).blob(mac).blob(node_nonce).buf)


def _start(kind: Msg) -> Writer:
    w = Writer()
    w.buf += CONTROL_MAGIC
    return w.u16(PROTOCOL_VERSION).u16(kind)


def encode_register(r: Registration) -> bytes:
    w = _start(Msg.REGISTER).text(r.version).u8(r.role).i64(r.rank).u16(r.group)
    w.u16(r.gpu).u32(r.pid).text(r.host).blob(r.address)
    w.u16(r.num_workers).u16(r.num_servers).u16(r.group_size).text(r.topology).blob(r.lane_address)
    return bytes(w.buf)


def encode_welcome(node_id: int, rank: int, rejoin: bool = False, proof: bytes = b"") -> bytes:
    """``proof``: the scheduler's answer to the node's nonce (empty without authentication)."""
    return bytes(_start(Msg.WELCOME).u16(node_id).u32(rank).u8(int(rejoin)).blob(proof).buf)


def encode_book(peers: list[Peer] | tuple[Peer, ...], kind: Msg = Msg.BOOK) -> bytes:
    w = _start(kind).u16(len(peers))
    for p in peers:
        w.u16(p.node_id).u8(p.role).u32(p.rank).u16(p.group).text(p.host).blob(p.address).blob(p.lane_address)
    return bytes(w.buf)


def encode_barrier(seq: int, scope: int) -> bytes:
    return bytes(_start(Msg.BARRIER).u32(seq).u8(scope).buf)


def encode_release(seq: int, scope: int, code: int = 0, text: str = "") -> bytes:
    """A barrier passed (code 0) or failed (a non-zero ErrorCode, with the reason)."""
    return bytes(_start(Msg.RELEASE).u32(seq).u8(scope).u16(code).text(text[:MAX_STRING]).buf)


def encode_heartbeat() -> bytes:
    return bytes(_start(Msg.HEARTBEAT).buf)


def encode_error(code: ErrorCode, text: str) -> bytes:
    return bytes(_start(Msg.ERROR).u16(code).text(text[:MAX_STRING]).buf)


def encode_stopping(node_id: int) -> bytes:
    return bytes(_start(Msg.STOPPING).u16(node_id).buf)


def encode_peer_dead(node_id: int, role: Role, rank: int, text: str) -> bytes:
    return bytes(_start(Msg.PEER_DEAD).u16(node_id).u8(role).u32(rank).text(text[:MAX_STRING]).buf)


def _role(value: int) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise ProtocolError(f"unknown role code {value}") from None


def decode_control(data: bytes | bytearray | memoryview) -> Control:
    """Decode one control message.

    Raises:
        ProtocolError: wrong magic or version, unknown kind, truncated or oversized fields.
    """
    if len(data) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control message of {len(data)} bytes exceeds {MAX_CONTROL_BYTES}")
    r = Reader(data, "control message")
    magic = bytes(r.mv[:4]) if len(r.mv) >= 4 else b""
    if magic != CONTROL_MAGIC:
        raise ProtocolError(f"not a stepmesh control message (magic {magic!r})")
    r.pos = 4
    version = r.u16()
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"control protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})"
        )
    try:
        kind = Msg(r.u16())
    except ValueError as e:
        raise ProtocolError(f"unknown control message kind: {e}") from None
    if kind is Msg.REGISTER:
        reg = Registration(
            version=r.text(),
            role=_role(r.u8()),
            rank=r.i64(),
            group=r.u16(),
            gpu=r.u16(),
            pid=r.u32(),
            host=r.text(),
            address=r.blob(MAX_ADDRESS),
            num_workers=r.u16(),
            num_servers=r.u16(),
            group_size=r.u16(),
            topology=r.text(),
            lane_address=r.blob(MAX_ADDRESS),
        )
        msg = Control(kind, registration=reg)
    elif kind is Msg.WELCOME:
        msg = Control(kind, node_id=r.u16(), rank=r.u32(), code=r.u8(), blob=r.blob(AUTH_MAC_BYTES))  # code 1: a rejoin
    elif kind is Msg.BOOK or kind is Msg.PEER_BACK:
        n = r.u16()
        if n > MAX_PEERS:
            raise ProtocolError(f"address book of {n} peers exceeds {MAX_PEERS}")
        peers = tuple(
            Peer(r.u16(), _role(r.u8()), r.u32(), r.u16(), r.text(), r.blob(MAX_ADDRESS), r.blob(MAX_ADDRESS))
            for _ in range(n)
        )
        msg = Control(kind, peers=peers)
    elif kind is Msg.BARRIER:
        msg = Control(kind, seq=r.u32(), scope=r.u8())
    elif kind is Msg.RELEASE:
        msg = Control(kind, seq=r.u32(), scope=r.u8(), code=r.u16(), text=r.text())
    elif kind is Msg.HEARTBEAT:
        msg = Control(kind)
    elif kind is Msg.ERROR:
        msg = Control(kind, code=r.u16(), text=r.text())
    elif kind is Msg.CHALLENGE:
        msg = Control(kind, blob=r.blob(AUTH_NONCE_BYTES))
    elif kind is Msg.PROOF:
        msg = Control(kind, blob=r.blob(AUTH_MAC_BYTES), nonce=r.blob(AUTH_NONCE_BYTES))
    elif kind is Msg.STOPPING:
        msg = Control(kind, node_id=r.u16())
    else:  # PEER_DEAD
        node_id = r.u16()
        role = _role(r.u8())
        msg = Control(kind, node_id=node_id, role=role, rank=r.u32(), text=r.text())
    r.done()
    return msg
