"""The data plane's wire format: tags, request and response headers, limits, result codes.

This module is the single source of every constant the compiled core uses: the
build generates ``stepmesh/_core/wire.pxi`` from :func:`cython_constants`, and
importing the data plane checks the compiled values against these, field by
field (a stale build fails loudly). It imports nothing but the standard library,
so the build can load it on its own.

A push_pull is, per server, one request message (the header, with small
tensors copied behind it) and one tag message per large push tensor, received
straight into its destination. The answer is one response message (header,
then small answers) and one tag message per large answer, received straight
into the worker's pull tensor.

A device answer can instead be *written*: the worker maps its pull tensor with
``ucp_mem_map``, packs a remote key for it and carries the key in the request
header (once per call signature: the header is the layout, so a new key is a
new layout on the server). The server then puts the answer straight into the
pull tensor (``ucp_put_nbx``), flushes the endpoint, and only then sends the
response header: the worker posts one receive per server, not one per answer.
A server that cannot put an answer (its memory is of another kind than the
pull tensor, UCX refused the key or the put) sends it as a tag message instead
and marks its size in the response (``ANSWER_MOVED_BIT``); the worker receives
it once the response header is in.

A small device tensor (a token count, pushed or answered) would be a tiny eager
device message, which UCX copies through the host, synchronously, on both
sides. Where the worker and every server it addresses have a *lane*, a second
UCX worker of each node whose rendezvous threshold is 0, it goes there instead
as a message of its own, and UCX moves it device to device (CUDA-IPC, RDMA)
into its destination (the server's receive buffer, the worker's pull tensor).
Without a lane, device answers that come with a small device answer
(a hidden state and its token count) travel packed: the server copies them on
the device into one buffer, sends it as one message, and the worker copies
them out on the device. Pushes are never packed: the server would have to copy
them out into its registered memory, and measured on one GPU that cost more
than the message it saves. The worker decides, per tensor, how it travels, and
says so in the header; the server follows.

Little endian throughout (x86-64 and aarch64 are).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

__all__ = [
    "DATA_VERSION", "Placement", "REQ_WRITTEN", "RKEY_MAX", "ANSWER_MOVED_BIT", "Result", "Failure", "AnswerProblem", "AnswerWay", "MemHint", "Tag", "make_tag", "wireup_tag",
    "REQ_FIXED", "REQ_TENSOR", "REQ_DIM", "REQ_PULL", "RESP_FIXED", "RESP_SIZE",
    "HEADER_MAX", "INLINE_MAX", "DEVICE_INLINE_MAX", "MAX_TENSORS", "MAX_PULLS", "MAX_NDIM",
    "MAX_TENSOR_BYTES", "MAX_IN_FLIGHT", "RING_DEPTH", "SLOT_SIZE", "TRACE_KEEP",
    "STATUS_OK", "STATUS_REFUSED", "REFUSAL_SLOT", "REFUSAL_MAX", "FLAG_DEVICE",
    "PACK_SLOT", "PACK_SMALL", "PACK_MAX", "PACK_ALIGN", "pack_placements", "pack_offsets",
    "LANE_MAX", "LANE_OPTIONS", "lane_placements", "push_placements", "answer_placements", "written_candidates",
    "SEQ_OFFSET", "SEQ_MASK", "SEQ_SHIFT", "TAG_MASK_KIND_NODE", "UCX_OPTIONS",
    "inline_placements", "request_header_size", "response_header_size", "cython_constants", "write_pxi", "check_core",
    "TensorMeta", "PullMeta", "RequestHeader", "WireError", "decode_request",
]

DATA_VERSION = 8  # 8: written answers (a remote key per written pull in the header); 7: small device answers on the lane too; 6: small device pushes on the lane; 5: packed device answers (4: placements in the header, refusals apart, staged answers)

# ---------------------------------------------------------------- tag layout
# kind (4 bits) | sender node id (12 bits) | sequence (32 bits) | slot (16 bits)


class Tag(IntEnum):
    WIREUP = 1
    REQUEST = 2
    PUSH = 3  # slot: the push tensor's index
    RESPONSE = 4  # slot 0: the header; REFUSAL_SLOT: a refusal's reason
    PULL = 5  # slot: the answer's index, or PACK_SLOT


KIND_SHIFT = 60
NODE_SHIFT = 48
SEQ_SHIFT = 16
SEQ_MASK = 0xFFFFFFFF
MAX_NODE_ID = (1 << 12) - 1
TAG_MASK_KIND_NODE = ((1 << 16) - 1) << NODE_SHIFT
REFUSAL_SLOT = 0xFFFF
PACK_SLOT = 0xFFFE  # PULL: the slot of an answer's packed device tensors


def make_tag(kind: int, node: int, seq: int = 0, slot: int = 0) -> int:
    """The 64-bit UCX tag of one message."""
    return (kind << KIND_SHIFT) | (node << NODE_SHIFT) | ((seq & SEQ_MASK) << SEQ_SHIFT) | slot


def wireup_tag(node_id: int) -> int:
    """The tag of the one wire-up message node ``node_id`` sends each peer at bring-up."""
    return make_tag(Tag.WIREUP, node_id)


# ------------------------------------------------------------------- limits
HEADER_MAX = 8192  # bytes of a request header
INLINE_MAX = 16384  # bytes of tensors copied behind one header
# A device tensor at most this large travels inline, staged through pinned memory. 0: never. Measured on an
# H200 under MPS, a staged 4-byte count cost 10-15 us of copy and synchronisation on each side, in series with
# the send; as a message of its own, UCX moves it alongside the hidden state's rendezvous.
DEVICE_INLINE_MAX = 0
SLOT_SIZE = HEADER_MAX + INLINE_MAX  # a server's receive slot for one request message
RING_DEPTH = 8  # receive slots kept posted per worker
MAX_TENSORS = 64  # push tensors per request
MAX_PULLS = 256  # pull tensors per request, all servers together
MAX_NDIM = 8
# Device answers are packed when one of them is at most PACK_SMALL bytes and they total at most PACK_MAX; each
# starts at a multiple of PACK_ALIGN in the packed buffer.
PACK_SMALL = 65536
PACK_MAX = 64 << 20
PACK_ALIGN = 256
# A separate device push or answer at most this large goes on the lane (larger ones go by rendezvous anyway: see UCX_OPTIONS).
LANE_MAX = HEADER_MAX + INLINE_MAX
MAX_TENSOR_BYTES = 1 << 40
MAX_IN_FLIGHT = 1024  # push_pulls one worker may have outstanding
TRACE_KEEP = 4096  # completed push_pulls whose traces a worker keeps
REFUSAL_MAX = 4096  # bytes of a refusal's reason (UTF-8)
FLAG_DEVICE = 1  # request flag: device memory involved (informational)
STATUS_OK = 0
STATUS_REFUSED = 1


class Placement(IntEnum):
    """How one tensor travels: copied behind its header, as a tag message of its own, or packed."""

    INLINE = 0
    SEPARATE = 1
    PACKED = 2  # a device answer, in the one message of its server's packed answers
    LANE = 3  # a small device push or answer, as a tag message of its own on the lane
    WRITTEN = 4  # an answer the server puts into the pull tensor (its remote key is in the request header)


# --------------------------------------------------------------- headers
# version, flags, n_push, n_servers, pulls per server, seq
REQ_FIXED = struct.Struct("<BBHHHI")
SEQ_OFFSET = 8
# key, dtype code, ndim, placement, device (1: the worker's tensor is device memory), nbytes; then ndim x REQ_DIM
REQ_TENSOR = struct.Struct("<qBBBBQ")
REQ_DIM = struct.Struct("<q")
# key, capacity in bytes, placement, device
REQ_PULL = struct.Struct("<qQBB")
# after the pulls, one per WRITTEN pull, in order: the pull tensor's address, its remote key's bytes (the key follows)
REQ_WRITTEN = struct.Struct("<QH")
RKEY_MAX = 1024  # bytes of one packed remote key (a larger one: the answer is not written)
ANSWER_MOVED_BIT = 63  # in a written answer's size: the server sent it as a tag message instead (PULL, its index)
# version, flags, status, n answers, seq, server stamps: request complete, batch taken, respond called, answer sent
RESP_FIXED = struct.Struct("<BBHHIQQQQ")
RESP_SIZE = struct.Struct("<Q")  # one per answer: its bytes


def inline_placements(sizes: list[int] | tuple[int, ...], device: list[bool] | tuple[bool, ...]) -> list[Placement]:
    """Which tensors travel behind the header, in order, within ``INLINE_MAX`` bytes.

    A host tensor goes inline while it fits the room left; a device tensor only
    when it is also at most ``DEVICE_INLINE_MAX`` (staged through pinned memory;
    0 today: every device tensor is a message of its own). A large hidden state
    goes by itself, zero-copy, by rendezvous.
    """
    room = INLINE_MAX
    out = []
    for n, dev in zip(sizes, device):
        fits = n <= room and (not dev or 0 < n <= DEVICE_INLINE_MAX)
        if fits:
            room -= n
        out.append(Placement.INLINE if fits else Placement.SEPARATE)
    return out


def lane_placements(sizes: list[int] | tuple[int, ...], device: list[bool] | tuple[bool, ...],
                    placements: list[Placement]) -> list[Placement]:
    """``placements`` of pushes or answers with the small separate device ones moved to the lane (both sides have one).

    On the data worker UCX sends a device message below its rendezvous
    threshold eagerly, copying it through host memory synchronously on both
    sides; on the lane, whose threshold is 0, it moves device to device.
    """
    return [Placement.LANE if p is Placement.SEPARATE and dev and 0 < n <= LANE_MAX else p
            for n, dev, p in zip(sizes, device, placements)]


def pack_placements(sizes: list[int] | tuple[int, ...], device: list[bool] | tuple[bool, ...],
                    placements: list[Placement]) -> list[Placement]:
    """``placements`` of one server's answers with the device ones that travel separately packed, where that pays.

    Packing costs a device copy on each side; it pays when a small device answer
    would otherwise be a message of its own (see the module's docstring).
    """
    sep = [i for i, (dev, p) in enumerate(zip(device, placements)) if dev and p is Placement.SEPARATE]
    if len(sep) < 2 or min(sizes[i] for i in sep) > PACK_SMALL or pack_offsets([sizes[i] for i in sep])[-1] > PACK_MAX:
        return list(placements)
    out = list(placements)
    for i in sep:
        out[i] = Placement.PACKED
    return out


def push_placements(sizes: list[int] | tuple[int, ...], device: list[bool] | tuple[bool, ...],
                    lane: bool) -> list[Placement]:
    """How a worker's pushes travel: inline where they fit, else separately, small device ones on the lane when
    the worker and every server it addresses have one (``lane``)."""
    placements = inline_placements(sizes, device)
    return lane_placements(sizes, device, placements) if lane else placements


def written_candidates(sizes: list[int] | tuple[int, ...], device: list[bool] | tuple[bool, ...],
                       level: str) -> list[bool]:
    """Which answers may be written one-sided at ``STEPMESH_ONE_SIDED`` ``level`` (``off``, ``device``, ``all``):
    those that would not travel inline, device ones only unless ``all`` (the worker maps each and packs its key)."""
    inline = inline_placements(sizes, device)
    return [level != "off" and p is Placement.SEPARATE and n > 0 and (dev or level == "all")
            for n, dev, p in zip(sizes, device, inline)]


def answer_placements(sizes: list[int] | tuple[int, ...], device: list[bool] | tuple[bool, ...],
                      lane: bool, written: list[bool] | tuple[bool, ...] = ()) -> list[Placement]:
    """How one server's answers travel: inline where they fit, WRITTEN where ``written`` (the worker has a key for
    the pull tensor), else as pushes would, then the device ones still separate packed where that pays."""
    placements = inline_placements(sizes, device)
    if written:
        placements = [Placement.WRITTEN if w and p is Placement.SEPARATE else p for p, w in zip(placements, written)]
    if lane:
        placements = lane_placements(sizes, device, placements)
    return pack_placements(sizes, device, placements)


def pack_offsets(sizes: list[int]) -> list[int]:
    """Where each of the packed tensors of ``sizes`` (bytes, in order) starts, and then the packed size."""
    out, pos = [], 0
    for n in sizes:
        out.append(pos)
        pos += -(-n // PACK_ALIGN) * PACK_ALIGN
    return out + [pos]


def request_header_size(ndims: list[int], n_pulls: int, rkeys: list[bytes] | tuple[bytes, ...] = ()) -> int:
    """Bytes of a request header: the fixed part, the tensors with their shapes, the pulls, the written pulls' keys."""
    return REQ_FIXED.size + sum(REQ_TENSOR.size + REQ_DIM.size * d for d in ndims) + REQ_PULL.size * n_pulls \
        + sum(REQ_WRITTEN.size + len(k) for k in rkeys)


def response_header_size(n: int) -> int:
    """The fixed part and the ``n`` answer sizes of a response (inline answers follow)."""
    return RESP_FIXED.size + RESP_SIZE.size * n


class WireError(ValueError):
    """A malformed request header (the server words it as a ProtocolError naming the worker)."""


@dataclass(frozen=True)
class TensorMeta:
    key: int
    dtype: int  # wire code
    shape: tuple[int, ...]
    nbytes: int
    placement: Placement
    device: bool  # the worker's tensor is device memory


@dataclass(frozen=True)
class PullMeta:
    key: int
    capacity: int
    placement: Placement
    device: bool
    address: int = 0  # WRITTEN: the pull tensor's address in the worker
    rkey: bytes = b""  # WRITTEN: its packed remote key


@dataclass(frozen=True)
class RequestHeader:
    flags: int
    seq: int
    n_servers: int
    per_server: int
    tensors: tuple[TensorMeta, ...]
    pulls: tuple[PullMeta, ...]  # every server's, server-major
    size: int  # bytes of the header; inline tensors follow in order

    def pulls_for(self, server_index: int) -> tuple[PullMeta, ...]:
        p = self.per_server
        return self.pulls[server_index * p : (server_index + 1) * p]


def _check_lane(what: str, kind: str, nbytes: int, device: int, lane: bool) -> None:
    """Raises WireError unless ``what`` may travel on the lane: a lane joins server and worker, and it is a
    device tensor of 1 to LANE_MAX bytes."""
    if not lane:
        raise WireError(f"{what}: no lane joins this server and the worker")
    if not (device and 0 < nbytes <= LANE_MAX):
        raise WireError(f"{what}: only device {kind} of 1 to {LANE_MAX} bytes go there")


def decode_request(buf: bytes, itemsizes: dict[int, int], lane: bool = False) -> RequestHeader:
    """Decode and check a request header (and that its inline tensors fit the slot).

    Args:
        buf: a receive slot's bytes (the header, then the inline tensors).
        itemsizes: dtype code -> element size, for the shape/size cross-check.
        lane: a lane joins the server and this worker (small device pushes and answers may travel on it).

    Raises:
        WireError: any inconsistency.
    """
    if len(buf) < REQ_FIXED.size:
        raise WireError("request header truncated")
    version, flags, n_push, n_servers, per_server, seq = REQ_FIXED.unpack_from(buf, 0)
    if version != DATA_VERSION:
        raise WireError(f"data protocol version {version} is not supported (this side speaks {DATA_VERSION})")
    if n_push > MAX_TENSORS:
        raise WireError(f"request has {n_push} tensors, more than {MAX_TENSORS}")
    if n_servers * per_server > MAX_PULLS:
        raise WireError(f"request has {n_servers * per_server} pulls, more than {MAX_PULLS}")
    pos = REQ_FIXED.size
    tensors = []
    for _ in range(n_push):
        if pos + REQ_TENSOR.size > min(len(buf), HEADER_MAX):
            raise WireError("request header truncated in the tensor list")
        key, dtype, ndim, placement, device, nbytes = REQ_TENSOR.unpack_from(buf, pos)
        pos += REQ_TENSOR.size
        if ndim > MAX_NDIM:
            raise WireError(f"tensor with {ndim} dimensions, more than {MAX_NDIM}")
        if dtype not in itemsizes:
            raise WireError(f"unknown dtype code {dtype}")
        if placement not in (Placement.INLINE, Placement.SEPARATE, Placement.LANE):
            raise WireError(f"unknown placement {placement}")
        if placement == Placement.LANE:
            _check_lane(f"a push of {nbytes} bytes on the lane", "pushes", nbytes, device, lane)
        if pos + REQ_DIM.size * ndim > len(buf):
            raise WireError("request header truncated in a shape")
        shape = struct.unpack_from(f"<{ndim}q", buf, pos)
        pos += REQ_DIM.size * ndim
        count = 1
        for d in shape:
            if d < 0:
                raise WireError(f"negative dimension in shape {shape}")
            count *= d
        if count * itemsizes[dtype] != nbytes or nbytes > MAX_TENSOR_BYTES:
            raise WireError(f"tensor of shape {shape} does not match its {nbytes} bytes")
        tensors.append(TensorMeta(key, dtype, tuple(shape), nbytes, Placement(placement), bool(device)))
    n_pulls = n_servers * per_server
    if pos + REQ_PULL.size * n_pulls > min(len(buf), HEADER_MAX):
        raise WireError("request header truncated in the pull list")
    pulls = []
    for i in range(n_pulls):
        key, cap, placement, device = REQ_PULL.unpack_from(buf, pos + i * REQ_PULL.size)
        if placement not in (Placement.INLINE, Placement.SEPARATE, Placement.PACKED, Placement.LANE, Placement.WRITTEN) \
                or cap > MAX_TENSOR_BYTES or (placement == Placement.PACKED and not device):
            raise WireError(f"pull {i}: placement {placement}, capacity {cap}")
        if placement == Placement.LANE:
            _check_lane(f"pull {i} of {cap} bytes answered on the lane", "answers", cap, device, lane)
        pulls.append(PullMeta(key, cap, Placement(placement), bool(device)))
    pos += REQ_PULL.size * n_pulls
    for i, p in enumerate(pulls):
        if p.placement is not Placement.WRITTEN:
            continue
        if pos + REQ_WRITTEN.size > min(len(buf), HEADER_MAX):
            raise WireError("request header truncated in the written pulls' keys")
        address, n = REQ_WRITTEN.unpack_from(buf, pos)
        pos += REQ_WRITTEN.size
        if not 0 < n <= RKEY_MAX or pos + n > min(len(buf), HEADER_MAX):
            raise WireError(f"pull {i}: a remote key of {n} bytes")
        pulls[i] = PullMeta(p.key, p.capacity, p.placement, p.device, address, bytes(buf[pos : pos + n]))
        pos += n
    inline = sum(t.nbytes for t in tensors if t.placement is Placement.INLINE)
    if inline > INLINE_MAX or pos + inline > SLOT_SIZE:
        raise WireError(f"inline tensors of {inline} bytes overrun the {SLOT_SIZE}-byte slot")
    for s in range(n_servers):
        share = pulls[s * per_server : (s + 1) * per_server]
        if sum(p.capacity for p in share if p.placement is Placement.INLINE) > INLINE_MAX:
            raise WireError(f"server {s}'s inline answers would exceed {INLINE_MAX} bytes")
        if pack_offsets([p.capacity for p in share if p.placement is Placement.PACKED])[-1] > PACK_MAX:
            raise WireError(f"server {s}'s packed answers would exceed {PACK_MAX} bytes")
    return RequestHeader(flags, seq, n_servers, per_server, tuple(tensors), tuple(pulls), pos)


# ---------------------------------------------------------- core results
class Result(IntEnum):
    """What a call into the compiled core returns (the core never raises for these)."""

    DONE = 0  # complete / sent
    PENDING = 1  # not yet: progress and ask again
    UNKNOWN = 2  # no such handle
    NO_PLAN = 3  # push_pull: a signature the core has not been given a plan for
    LIMIT = 4  # push_pull: MAX_IN_FLIGHT calls outstanding
    FAILED = 5  # the call failed: ``failure()`` says why
    NEW_LAYOUT = 6  # get_batch: a request of a layout the core does not know waits (``pending_header()``)
    BAD_ANSWER = 7  # respond: the answers do not suit the request (nothing was sent)
    CLOSED = 8  # the core was closed
    SLOT_FAILED = 9  # get_batch: UCX failed a request receive (``slot_failure()``)


class Failure(IntEnum):
    """Why a push_pull failed (the first element of ``Worker.failure()``)."""

    UCX = 1  # (UCX, server or -1, status)
    REFUSED = 2  # (REFUSED, server, reason)
    BAD_RESPONSE = 3  # (BAD_RESPONSE, server, version, seq, n)
    TOO_LONG = 4  # (TOO_LONG, server, answer index, bytes, capacity)
    DEVICE = 5  # (DEVICE, server, driver status): a device copy failed


class MemHint(IntEnum):
    """What a buffer is known to be, for ``UCP_OP_ATTR_FIELD_MEMORY_TYPE`` (``Ucp.send``/``recv``'s ``mem``; a Ucp
    tells UCX up to its ``hints`` level and leaves the rest to UCX: the levels off, host, all are 0, 1, 2)."""

    DETECT = 0  # not said: UCX looks the address up
    HOST = 1
    CUDA = 2


class AnswerProblem(IntEnum):
    """What the core found wrong with an answer before sending (``Server.answer_problem()``)."""

    COUNT = 1
    NOT_TENSOR = 2
    LAYOUT = 3  # not contiguous, or a dtype the wire has no code for
    TOO_BIG = 4
    DEVICE = 5  # a device copy failed


class AnswerWay(IntEnum):
    """How a worker's core takes in one answer of a plan (``Worker.add_plan``'s per-answer ``how``)."""

    COPY = 0  # inline in the response, copied out
    SCATTER = 1  # inline, and UCX puts it in place behind the header
    SEPARATE = 2  # a message of its own
    PACKED = 3  # in the server's packed message, at an offset
    LANE = 4  # a message of its own on the lane
    WRITTEN = 5  # put by the server; a message only if the response says so


# UCX options of every data worker (the bench's raw-ucxx floor uses them too): a
# request or response with its inline payload goes eagerly (ucxx's 8 KiB
# rendezvous threshold would add a round trip) and, through shared memory, in
# one FIFO element (UCX's 8256-byte default splits it, and the sender must
# progress again for the rest).
UCX_OPTIONS = {"RNDV_THRESH": str(SLOT_SIZE), "MM_SEG_SIZE": str(INLINE_MAX + 1024)}


# The lane's: its rendezvous threshold is 0, whatever the memory (UCX sets it per context, not per memory type;
# on the data worker, 0 would double the round trip of every small host message).
LANE_OPTIONS = {"RNDV_THRESH": "0"}


# ------------------------------------------------------ the compiled core
def _constants() -> dict[str, int]:
    """Every constant the core is built with, by the name it has there."""
    out: dict[str, int] = {
        "DATA_VERSION": DATA_VERSION, "KIND_SHIFT": KIND_SHIFT, "NODE_SHIFT": NODE_SHIFT, "SEQ_SHIFT": SEQ_SHIFT,
        "SEQ_OFFSET": SEQ_OFFSET, "HEADER_MAX": HEADER_MAX, "INLINE_MAX": INLINE_MAX,
        "DEVICE_INLINE_MAX": DEVICE_INLINE_MAX, "SLOT_SIZE": SLOT_SIZE, "RING_DEPTH": RING_DEPTH,
        "MAX_TENSORS": MAX_TENSORS, "MAX_PULLS": MAX_PULLS, "MAX_NDIM": MAX_NDIM, "MAX_IN_FLIGHT": MAX_IN_FLIGHT,
        "TRACE_KEEP": TRACE_KEEP, "REFUSAL_MAX": REFUSAL_MAX, "REFUSAL_SLOT": REFUSAL_SLOT,
        "STATUS_OK": STATUS_OK, "STATUS_REFUSED": STATUS_REFUSED, "FLAG_DEVICE": FLAG_DEVICE,
        "REQ_FIXED_SIZE": REQ_FIXED.size, "REQ_TENSOR_SIZE": REQ_TENSOR.size, "REQ_DIM_SIZE": REQ_DIM.size,
        "REQ_PULL_SIZE": REQ_PULL.size, "RESP_FIXED_SIZE": RESP_FIXED.size, "RESP_SIZE_SIZE": RESP_SIZE.size,
        "INLINE": Placement.INLINE, "SEPARATE": Placement.SEPARATE, "PACKED": Placement.PACKED,
        "LANE": Placement.LANE, "WRITTEN": Placement.WRITTEN, "REQ_WRITTEN_SIZE": REQ_WRITTEN.size,
        "RKEY_MAX": RKEY_MAX, "ANSWER_MOVED_BIT": ANSWER_MOVED_BIT,
        "PACK_SLOT": PACK_SLOT, "PACK_ALIGN": PACK_ALIGN,
    }
    for enum in (Tag, Result, Failure, AnswerProblem, MemHint, AnswerWay):
        prefix = {
            "Tag": "TAG_", "Result": "R_", "Failure": "F_", "AnswerProblem": "A_", "MemHint": "HINT_",
            "AnswerWay": "ANSWER_",
        }[enum.__name__]
        out.update({prefix + m.name: int(m) for m in enum})
    # offsets of the response fields the core reads and writes
    for name, off in (("RESP_STATUS_AT", 2), ("RESP_N_AT", 4), ("RESP_SEQ_AT", 6), ("RESP_STAMPS_AT", 10)):
        out[name] = off
    return out


def _check_offsets() -> None:
    """The offsets in ``_constants`` agree with the structs (run at build time and in the tests)."""
    probe = RESP_FIXED.pack(1, 2, 0x0303, 0x0404, 0x05050505, 6, 7, 8, 9)
    assert probe[2:4] == b"\x03\x03" and probe[4:6] == b"\x04\x04" and probe[6:10] == b"\x05" * 4
    assert probe[10] == 6 and RESP_FIXED.size == 42
    assert REQ_FIXED.pack(0, 0, 0, 0, 0, 0xAABBCCDD)[SEQ_OFFSET:] == b"\xdd\xcc\xbb\xaa"


def cython_constants() -> str:
    """The text of ``_core/wire.pxi``: every constant as a C enum of the core, and ``_CONSTANTS`` exporting them."""
    _check_offsets()
    lines = [
        "# Generated from stepmesh/data/wire.py by the build (setup.py); do not edit.",
        "cdef enum:",
    ]
    lines += [f"    {name} = {value}" for name, value in _constants().items() if value < 2**31]
    lines.append(f"cdef unsigned long long TAG_MASK_KIND_NODE = {TAG_MASK_KIND_NODE}ULL")
    lines.append("_CONSTANTS = {")
    lines += [f"    {name!r}: {name}," for name, value in _constants().items() if value < 2**31]
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_pxi(path: str) -> bool:
    """Write :func:`cython_constants` to ``path`` unless it already holds that text; True when it wrote.

    The build, ``benchmarks/device_run.sh`` and ``benchmarks/core_probe.py`` all generate ``wire.pxi`` through
    this, by running this file: ``python wire.py PATH``.
    """
    text = cython_constants()
    try:
        with open(path, encoding="utf-8") as fh:
            if fh.read() == text:
                return False
    except FileNotFoundError:
        pass
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return True


def check_core(built: dict[str, int]) -> None:
    """Raise when the compiled core was built from another version of this file.

    Raises:
        ImportError: a field differs (a stale build: reinstall stepmesh).
    """
    expected = {k: v for k, v in _constants().items() if v < 2**31}
    wrong = sorted(k for k in expected.keys() | built.keys() if expected.get(k) != built.get(k))
    if wrong:
        details = ", ".join(f"{k}: core {built.get(k)}, wire {expected.get(k)}" for k in wrong[:6])
        raise ImportError(
            f"stepmesh's compiled core was built for another wire format ({details}); "
            "rebuild it: pip install --force-reinstall --no-deps stepmesh (or pip install -e . in a checkout)"
        )


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python wire.py PATH  (writes the core's wire.pxi there)")
    write_pxi(sys.argv[1])
