"""The ``protocol`` contender: stepmesh's own messages for the workload, and nothing else.

The same messages as a 1 x 1 push_pull, with the same sizes, tags and copies,
through the compiled core's libucp calls: the request header with the small
pushes copied behind it and each large push as a message of its own; the
response header with the small answers behind it and each large answer as its
own message into a receive posted in advance (device pushes always travel as
messages of their own, as the core sends them; without a lane, device answers
with a small device answer among them travel packed, copied into one device
buffer on the server and out of it on the worker). None of the bookkeeping around them
(signatures, plans, records, checks, events, traces): how close any
implementation of this protocol could come to ``ucxx`` here.

Small device pushes and answers go on the lane, a second UCX worker whose
rendezvous threshold is 0, as the core sends them: where stepmesh's nodes open
a lane (``Config.lane_on``: on a GPU host unless ``STEPMESH_DEVICE_LANE=0``).

Answers stepmesh would have written (``STEPMESH_ONE_SIDED``) are written here
too: the worker packs a remote key for each such pull buffer (handed over at
set-up; the request header is as long as stepmesh's, keys included), and the
server puts them, flushes the endpoint, waits for both, then sends the
response header.
"""

from __future__ import annotations

from typing import Any

from .common import data_options, pin, serve_ping_pong
from .model import BenchOptions

__all__ = ["protocol_child"]

_SPIN = 1 << 30


def protocol_child(role: str, opts: BenchOptions, conn: Any, core: int | None) -> None:
    pin(core)
    import torch

    from stepmesh.config import Config
    from stepmesh.control import transport as T
    from stepmesh.data import wire as W
    from stepmesh.data.worker import written_keys

    wl = opts.workload
    dev = opts.device
    on_dev = dev.startswith("cuda")
    cfg = Config.from_env()
    lane = cfg.lane_on()  # as stepmesh's nodes decide
    tp = T.Transport(data_options(), opts.progress, lane_options={**data_options(), **W.LANE_OPTIONS} if lane else None,
                     memory_hints=cfg.memory_hints, one_sided=True)
    ucp = tp.ucp
    client = role == "client"
    # The worker owns the pushes and the pull buffers; the server the push buffers and the answers.
    mine = [t.make(dev, 1) for t in (wl.push if client else wl.pull)]
    theirs = [t.make(dev) for t in (wl.pull if client else wl.push)]
    # the pull buffers' mappings (alive while their keys are in use), and per answer (its address, its key)
    mapped = written_keys(ucp, theirs, len(theirs), cfg.one_sided) if client and cfg.one_sided != "off" else {}
    keys = {i: (theirs[i].data_ptr(), key) for i, (_, _, key) in mapped.items()}
    conn.send((tp.address, tp.lane_address, keys))
    peer, peer_lane, peer_keys = conn.recv()
    keys = keys if client else peer_keys
    endpoints = [tp.connect(peer)] + ([tp.connect_lane(peer_lane)] if lane else [])  # kept: handles die with them
    ep = endpoints[0].handle
    written = [i in keys for i in range(len(wl.pull))]
    rkeys = {i: ucp.unpack(ep, key) for i, (_, key) in keys.items()} if not client else {}

    def placements(ts: list[Any], answers: bool) -> list[W.Placement]:
        sizes, device = [t.nbytes for t in ts], [on_dev] * len(ts)
        if answers:
            return W.answer_placements(sizes, device, lane, written)
        return W.push_placements(sizes, device, lane)

    out_place, in_place = placements(mine, not client), placements(theirs, client)
    hsize = W.request_header_size([len(t.shape) for t in wl.push], len(wl.pull), [k for _, k in keys.values()])
    resp = W.response_header_size(len(wl.pull))
    out_head, in_head = (hsize, resp) if client else (resp, hsize)

    def inline(ts: list[Any], place: list[W.Placement], head: int) -> list[tuple[int, Any]]:
        out, pos = [], head
        for t, p in zip(ts, place):
            if p is W.Placement.INLINE and t.nbytes:
                out.append((pos, t.view(torch.uint8).view(-1)))
                pos += t.nbytes
        return out

    out_inline, in_inline = inline(mine, out_place, out_head), inline(theirs, in_place, in_head)
    out_len = out_head + sum(b.numel() for _, b in out_inline)
    out_buf = torch.zeros(out_len, dtype=torch.uint8, pin_memory=on_dev)
    in_buf = torch.zeros(W.SLOT_SIZE, dtype=torch.uint8, pin_memory=on_dev)
    def apart(ts: list[Any], place: list[W.Placement], how: W.Placement) -> list[tuple[int, int, int]]:
        return [(t.data_ptr(), t.nbytes, i) for i, (t, p) in enumerate(zip(ts, place)) if p is how]

    sends, recvs = apart(mine, out_place, W.Placement.SEPARATE), apart(theirs, in_place, W.Placement.SEPARATE)
    lane_sends, lane_recvs = apart(mine, out_place, W.Placement.LANE), apart(theirs, in_place, W.Placement.LANE)
    def packed(ts: list[Any], place: list[W.Placement]) -> tuple[list[tuple[int, Any]], Any]:
        views = [t.view(torch.uint8).view(-1) for t, p in zip(ts, place) if p is W.Placement.PACKED]
        *at, size = W.pack_offsets([v.numel() for v in views])
        return list(zip(at, views)), (torch.empty(size, dtype=torch.uint8, device=dev) if views else None)

    (out_packed, out_pack), (in_packed, in_pack) = packed(mine, out_place), packed(theirs, in_place)
    kinds = (W.Tag.REQUEST, W.Tag.PUSH, W.Tag.RESPONSE, W.Tag.PULL)
    out_kind, out_bulk, in_kind, in_bulk = kinds if client else kinds[2:] + kinds[:2]
    me, peer = (1, 2) if client else (2, 1)
    out_tag, out_bulk_tag = W.make_tag(out_kind, me), W.make_tag(out_bulk, me)
    in_tag, in_bulk_tag = W.make_tag(in_kind, peer), W.make_tag(in_bulk, peer)
    send, recv, wait = ucp.send, ucp.recv, ucp.wait
    H, D = W.MemHint.HOST, (W.MemHint.CUDA if on_dev else W.MemHint.HOST)  # as the core tells UCX (up to its level)
    lane_ep = endpoints[1].handle if lane else 0
    state: dict[str, Any] = {"seq": 0, "slot": None}

    def pack() -> None:
        for pos, src in out_inline:
            out_buf[pos : pos + src.numel()].copy_(src)
        for pos, src in out_packed:
            out_pack[pos : pos + src.numel()].copy_(src)
        if out_packed:
            torch.cuda.current_stream().synchronize()

    def unpack() -> None:
        for pos, dst in in_inline:
            dst.copy_(in_buf[pos : pos + dst.numel()])
        for pos, dst in in_packed:
            dst.copy_(in_pack[pos : pos + dst.numel()])
        if in_packed:
            torch.cuda.current_stream().synchronize()

    puts = [(t.data_ptr(), t.nbytes, keys[i][0], rkeys[i]) for i, (t, p) in enumerate(zip(mine, out_place))
            if p is W.Placement.WRITTEN]

    def post_out(bits: int) -> list[Any]:
        if puts:  # written answers: put, flush, and the header only once both are done
            done = [ucp.put(ep, ptr, n, raddr, key, D) for ptr, n, raddr, key in puts] + [ucp.flush(ep)]
            if not wait(done, _SPIN):
                raise RuntimeError("protocol baseline: the server's puts did not complete")
            for r in done:
                r.check_error()
        sent = [send(ep, out_buf.data_ptr(), out_len, out_tag | bits, H)]
        if out_pack is not None:
            sent.append(send(ep, out_pack.data_ptr(), out_pack.numel(), out_bulk_tag | bits | W.PACK_SLOT, D))
        sent += [send(lane_ep, ptr, n, out_bulk_tag | bits | i, D) for ptr, n, i in lane_sends]
        return sent + [send(ep, ptr, n, out_bulk_tag | bits | i, D) for ptr, n, i in sends]

    def one_client(bits: int) -> None:
        pack()
        got = [recv(in_buf.data_ptr(), in_buf.numel(), in_tag | bits, mem=H)]
        got += [recv(ptr, n, in_bulk_tag | bits | i, mem=D) for ptr, n, i in recvs]
        got += [recv(ptr, n, in_bulk_tag | bits | i, lane=True, mem=D) for ptr, n, i in lane_recvs]
        if in_pack is not None:
            got.append(recv(in_pack.data_ptr(), in_pack.numel(), in_bulk_tag | bits | W.PACK_SLOT, mem=D))
        sent = post_out(bits)
        wait(got + sent, _SPIN)
        unpack()

    def one_server(bits: int) -> None:
        slot = state["slot"] or recv(in_buf.data_ptr(), in_buf.numel(), in_tag, W.TAG_MASK_KIND_NODE, mem=H)
        wait([slot], _SPIN)
        got = [recv(ptr, n, in_bulk_tag | bits | i, mem=D) for ptr, n, i in recvs]
        got += [recv(ptr, n, in_bulk_tag | bits | i, lane=True, mem=D) for ptr, n, i in lane_recvs]
        unpack()
        wait(got, _SPIN)
        pack()
        sent = post_out(bits)
        state["slot"] = recv(in_buf.data_ptr(), in_buf.numel(), in_tag, W.TAG_MASK_KIND_NODE, mem=H)
        # Some rendezvous (CUDA IPC) move only while the sender progresses: the answer is seen through here.
        wait(sent, _SPIN)

    def one() -> None:
        seq = state["seq"] = (state["seq"] + 1) & W.SEQ_MASK
        (one_client if client else one_server)(seq << W.SEQ_SHIFT)

    one()
    if theirs and int(theirs[0].reshape(-1)[0].float()) != 1:  # the peer's tensors are filled with 1s
        raise RuntimeError(f"protocol baseline: the {role} received {theirs[0].reshape(-1)[0]!r}, expected 1")
    serve_ping_pong(conn, one)
    tp.close()
