"""What a small tensor costs next to a large one, by how it travels: a probe for the next data-path step.

A ping-pong of two processes: each direction is one large tensor (a tag
message, rendezvous) and, depending on the mode, one small tensor:

- ``none``: the large tensor alone (raw UCX's pattern, the floor);
- ``tag``: the small tensor as a tag message of its own (stepmesh's pushes
  today: UCX sends a tiny device message eagerly, copying it through the host
  synchronously on both sides);
- ``am-rndv``: the small tensor as a UCX active message sent with
  ``UCP_AM_SEND_FLAG_RNDV`` (rendezvous whatever its size: with CUDA-IPC the
  receiver copies it device to device, alongside the large one), received with
  ``ucp_am_recv_data_nbx`` straight into its destination;
- ``tag-ctx2``: the small tensor as a tag message on a second UCX context
  whose rendezvous threshold is 0, so that UCX sends it by rendezvous (with
  CUDA-IPC, copied device to device) while the first context keeps sending
  small host messages eagerly; both workers are progressed (in a Python loop,
  which only this mode pays).

The modes run interleaved in rounds; the output is each mode's p50 and p99
round trip. Run it on the GPU machine with MPS on (``benchmarks/device_run.sh
--mps run python3 benchmarks/small_tensor_probe.py --device cuda``). The AM
calls go through ctypes on the libucp that ucxx loaded; nothing of this is in
the library. ``measure()`` returns the samples (the quick test runs it on the CPU).
Figures: docs/performance.md, "GPU: one H100, MPS on: the push's count, by protocol".
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import statistics
import time
from typing import Any

import click

MODES = ("none", "tag", "am-rndv", "tag-ctx2")
_AM_ID = 77
_BIG, _SMALL = 1, 2  # tag kinds of this probe (its own worker: no clash with stepmesh's)
_SPIN = 1 << 30


class _HandlerParam(ctypes.Structure):  # ucp_am_handler_param_t (UCX 1.21; offsets checked against ucp.h)
    _fields_ = [
        ("field_mask", ctypes.c_uint64),
        ("id", ctypes.c_uint),
        ("flags", ctypes.c_uint32),
        ("cb", ctypes.c_void_p),
        ("arg", ctypes.c_void_p),
    ]


class _RecvParam(ctypes.Structure):  # ucp_am_recv_param_t
    _fields_ = [("recv_attr", ctypes.c_uint64), ("reply_ep", ctypes.c_void_p)]


class _RequestParam(ctypes.Structure):  # ucp_request_param_t: 72 bytes, flags at 4
    _fields_ = [("op_attr_mask", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 64)]


_AM_CB = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.POINTER(_RecvParam),
)
_FIELD_FLAGS, _SEND_RNDV, _RECV_RNDV = 16, 4, 1 << 17
_HANDLER_ID_CB = 1 | 4
_OK, _INPROGRESS = 0, 1


class _Am:
    """The AM side of the probe on one ucp worker: a handler keeping descriptors, sends and data receives."""

    def __init__(self, lib_path: str, worker: int):
        self.lib = lib = ctypes.CDLL(lib_path)
        self.worker = ctypes.c_void_p(worker)
        ptr, size, req = ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(_RequestParam)
        signatures: dict[str, tuple[Any, list[Any]]] = {  # name: (result, arguments), as ucp.h declares them
            "ucp_am_send_nbx": (ptr, [ptr, ctypes.c_uint, ptr, size, ptr, size, req]),
            "ucp_am_recv_data_nbx": (ptr, [ptr, ptr, ptr, size, req]),
            "ucp_request_check_status": (ctypes.c_int, [ptr]),
            "ucp_request_free": (None, [ptr]),
            "ucp_worker_set_am_recv_handler": (ctypes.c_int, [ptr, ctypes.POINTER(_HandlerParam)]),
        }
        for name, (result, args) in signatures.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = result, args
        self.arrived: list[tuple[int, int, bool]] = []  # (descriptor or data pointer, length, rendezvous)
        self._cb = _AM_CB(self._on_am)  # kept alive as long as the handler is set
        param = _HandlerParam(field_mask=_HANDLER_ID_CB, id=_AM_ID, cb=ctypes.cast(self._cb, ctypes.c_void_p))
        status = lib.ucp_worker_set_am_recv_handler(self.worker, ctypes.byref(param))
        if status != _OK:
            raise RuntimeError(f"ucp_worker_set_am_recv_handler: status {status}")
        self.send_param = _RequestParam(op_attr_mask=_FIELD_FLAGS, flags=_SEND_RNDV)
        self.recv_param = _RequestParam()

    def _on_am(self, arg: Any, header: Any, header_length: int, data: Any, length: int, param: Any) -> int:
        rndv = bool(param.contents.recv_attr & _RECV_RNDV)
        if not rndv:  # eager despite the flag: the data is only valid during this call
            raise RuntimeError("an active message arrived eagerly although rendezvous was forced")
        self.arrived.append((data, length, rndv))
        return _INPROGRESS  # the descriptor is ours until ucp_am_recv_data_nbx

    def send(self, ep: int, ptr: int, n: int) -> int:
        return self._request(self.lib.ucp_am_send_nbx(ep, _AM_ID, None, 0, ptr, n, ctypes.byref(self.send_param)))

    def recv_into(self, ptr: int, n: int) -> int:
        desc, length, _ = self.arrived.pop(0)
        if length != n:
            raise RuntimeError(f"an active message of {length} bytes, expected {n}")
        return self._request(self.lib.ucp_am_recv_data_nbx(self.worker, desc, ptr, n, ctypes.byref(self.recv_param)))

    @staticmethod
    def _request(h: int | None) -> int:
        if h is not None and h >= 2**64 - 256:
            raise RuntimeError(f"UCX failed an active-message operation: status {h - 2**64}")
        return h or 0

    def done(self, h: int) -> bool:
        if not h:
            return True
        status = self.lib.ucp_request_check_status(h)
        if status == _INPROGRESS:
            return False
        self.lib.ucp_request_free(h)
        if status != _OK:
            raise RuntimeError(f"UCX failed an active-message operation: status {status}")
        return True


def _node(role: str, device: str, big: int, small: int, ucx: dict[str, str], conn: Any) -> None:
    import torch

    from stepmesh.control import transport as T
    from stepmesh.data import wire as W

    tp = T.Transport({**W.UCX_OPTIONS, **ucx}, "polling", active_messages=True)
    tp2 = T.Transport({**W.UCX_OPTIONS, **ucx, "RNDV_THRESH": "0"}, "polling")
    conn.send((tp.address, tp2.address))
    peer_address, peer_address2 = conn.recv()
    endpoints = (tp.connect(peer_address), tp2.connect(peer_address2))  # kept: the handles die with them
    ep, ep2 = endpoints[0].handle, endpoints[1].handle
    ucp, ucp2 = tp.ucp, tp2.ucp
    am = _Am(T.ucp_library_path(), tp.worker.handle)
    me, peer = (1, 2) if role == "client" else (2, 1)
    big_out, big_in = (
        torch.ones(big, dtype=torch.uint8, device=device),
        torch.zeros(big, dtype=torch.uint8, device=device),
    )
    small_out = torch.full((small,), 3, dtype=torch.uint8, device=device)
    small_in = torch.zeros(small, dtype=torch.uint8, device=device)
    if device == "cuda":
        torch.cuda.synchronize()

    def tag(kind: int, node: int, seq: int) -> int:
        return W.make_tag(W.Tag.PUSH, node, seq, kind)

    def both(reqs: list[Any]) -> None:
        while not all([r.completed for r in reqs]):
            ucp.progress()
            ucp2.progress()

    def receive(mode: str, seq: int) -> None:
        got = [ucp.recv(big_in.data_ptr(), big, tag(_BIG, peer, seq))]
        if mode == "tag":
            got.append(ucp.recv(small_in.data_ptr(), small, tag(_SMALL, peer, seq)))
        if mode == "tag-ctx2":
            got.append(ucp2.recv(small_in.data_ptr(), small, tag(_SMALL, peer, seq)))
            both(got)
        ucp.wait(got, _SPIN)
        if mode == "am-rndv":
            while not am.arrived:
                ucp.progress()
            h = am.recv_into(small_in.data_ptr(), small)
            while not am.done(h):
                ucp.progress()
        for r in got:
            r.check_error()

    def send(mode: str, seq: int) -> None:
        sent = [ucp.send(ep, big_out.data_ptr(), big, tag(_BIG, me, seq))]
        if mode == "tag":
            sent.append(ucp.send(ep, small_out.data_ptr(), small, tag(_SMALL, me, seq)))
        if mode == "tag-ctx2":
            sent.append(ucp2.send(ep2, small_out.data_ptr(), small, tag(_SMALL, me, seq)))
            both(sent)
        h = am.send(ep, small_out.data_ptr(), small) if mode == "am-rndv" else 0
        ucp.wait(sent, _SPIN)
        while not am.done(h):
            ucp.progress()

    seq = 0
    while True:
        msg = conn.recv()
        if msg is None:
            break
        mode, n = msg
        lat = []
        for _ in range(n):
            seq += 1
            t0 = time.perf_counter_ns()
            if role == "client":
                send(mode, seq)
                receive(mode, seq)
            else:
                receive(mode, seq)
                send(mode, seq)
            lat.append(time.perf_counter_ns() - t0)
        if mode != "none" and int(small_in[0]) != 3:
            raise RuntimeError(f"{role}: the small tensor arrived as {int(small_in[0])}, expected 3 ({mode})")
        if mode != "none":
            small_in.zero_()
        conn.send(lat)
    tp2.close()
    tp.close()


def _get(conn: Any, procs: list[Any], timeout_s: float = 120.0) -> Any:
    """The next message from a node; an error when a node died or none came within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not conn.poll(0.5):
        if any(p.exitcode not in (None, 0) for p in procs):
            raise RuntimeError("a probe node died (its traceback is above)")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no word from a probe node in {timeout_s:.0f} s")
    return conn.recv()


def measure(
    device: str = "cpu",
    big: int = 917504,
    small: int = 4,
    iters: int = 1000,
    rounds: int = 4,
    ucx: dict[str, str] | None = None,
    warmup: int = 100,
) -> dict[str, list[int]]:
    """Round trips of each mode (ns), interleaved in ``rounds``, after ``warmup`` unmeasured ones per mode.

    Raises:
        RuntimeError: a node died (a UCX failure, a small tensor that arrived wrong) or hung.
    """
    ctx = mp.get_context("spawn")
    pipes = {r: ctx.Pipe() for r in ("client", "server")}
    procs = [
        ctx.Process(target=_node, args=(r, device, big, small, ucx or {}, pipes[r][1]), daemon=True) for r in pipes
    ]
    for p in procs:
        p.start()
    try:
        c, s = pipes["client"][0], pipes["server"][0]
        addr_c, addr_s = _get(c, procs), _get(s, procs)
        c.send(addr_s)
        s.send(addr_c)
        samples: dict[str, list[int]] = {m: [] for m in MODES}
        for m in MODES:
            for conn in (s, c):
                conn.send((m, warmup))
            _get(c, procs), _get(s, procs)
        for _ in range(rounds):
            for m in MODES:
                for conn in (s, c):
                    conn.send((m, iters // rounds))
                samples[m] += _get(c, procs)
                _get(s, procs)
        for conn in (c, s):
            conn.send(None)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    return samples


@click.command()
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--big", type=int, default=917504, show_default=True, help="Bytes of the large tensor.")
@click.option("--small", type=int, default=4, show_default=True, help="Bytes of the small tensor.")
@click.option("--iters", type=int, default=1000, show_default=True, help="Round trips per mode.")
@click.option(
    "--rounds", type=int, default=4, show_default=True, help="Interleaved rounds the iterations are split into."
)
@click.option("--ucx", multiple=True, metavar="KEY=VALUE", help="A UCX option over stepmesh's (RNDV_THRESH=0, say).")
def main(device: str, big: int, small: int, iters: int, rounds: int, ucx: tuple[str, ...]) -> None:
    """Ping-pong a large tensor each way with a small one beside it, by each mode; print p50/p99 per mode."""
    try:
        samples = measure(device, big, small, iters, rounds, dict(o.split("=", 1) for o in ucx))
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    floor = statistics.median(samples["none"]) / 1e3
    click.echo(
        f"{device}: {big} B + {small} B each way, {iters} round trips per mode in {rounds} rounds"
        f"{' (UCX ' + ' '.join(ucx) + ')' if ucx else ''}"
    )
    for m in MODES:
        us = sorted(x / 1e3 for x in samples[m])
        p50, p99 = statistics.median(us), us[int(0.99 * (len(us) - 1))]
        click.echo(f"{m:<8} p50 {p50:8.1f} us  p99 {p99:8.1f} us  ({p50 / floor:.2f}x the large tensor alone)")


if __name__ == "__main__":
    main()
