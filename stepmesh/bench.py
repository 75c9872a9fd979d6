"""Latency benchmark: stepmesh push_pull against its floors, interleaved in one run.

Contenders, each a set of processes that stay alive for the whole run and are
driven round by round (A B A B ...), so that machine drift hits all alike:

- ``stepmesh``: a real mesh (scheduler, servers, workers) doing push_pull.
- ``ucxx``: raw ucxx tag ping-pong of the same bytes (one message each way,
  endpoints from worker addresses, the receive pre-posted): the floor for
  anything on UCX.
- ``protocol``: stepmesh's own messages for the workload (one worker, one
  server), posted and completed with nothing around them: how close any
  implementation of the protocol could come to ``ucxx`` here. What stepmesh
  takes above it is its Python bookkeeping.
- ``gloo``: torch.distributed send/recv of the same bytes (``nccl`` on CUDA).
- ``nixl``: NIXL (where installed) WRITE + notification each way, the library
  vLLM uses for KV transfer; its progress thread off.

Processes not in their round block on a pipe, so they take no CPU from the
contender being measured.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "TensorSpec", "Workload", "PRESETS", "BenchOptions", "BenchResult", "run_bench", "summarize", "read_json", "write_json",
]

_SPAWN = mp.get_context("spawn")
_READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # a torch dtype name: "bfloat16", "float8_e4m3fn", "int32", ...

    @property
    def nbytes(self) -> int:
        import torch

        return math.prod(self.shape) * torch.empty(0, dtype=getattr(torch, self.dtype)).element_size()

    def make(self, device: str, fill: int = 0) -> Any:
        import torch

        dt = getattr(torch, self.dtype)
        t = torch.full(self.shape, fill % 100, dtype=torch.int32).to(dt) if dt.is_floating_point else torch.full(self.shape, fill % 100, dtype=dt)
        return t.to(device)


@dataclass(frozen=True)
class Workload:
    name: str
    push: tuple[TensorSpec, ...]  # every worker pushes these to every server
    pull: tuple[TensorSpec, ...]  # every server answers these to every worker
    workers: int = 1
    servers: int = 1

    @property
    def push_bytes(self) -> int:
        return sum(t.nbytes for t in self.push)

    @property
    def pull_bytes(self) -> int:
        return sum(t.nbytes for t in self.pull)


PRESETS: dict[str, Workload] = {
    "small": Workload("small", (TensorSpec((8192,), "uint8"),), (TensorSpec((8192,), "uint8"),)),
    "stepmesh-1x1": Workload(
        "stepmesh-1x1",
        (TensorSpec((64, 7168), "bfloat16"), TensorSpec((1,), "int32")),
        (TensorSpec((64, 7168), "bfloat16"), TensorSpec((1,), "int32")),
    ),
    "2a2f": Workload(
        "2a2f",
        (TensorSpec((128, 7168), "float8_e4m3fn"),),
        (TensorSpec((128, 7168), "bfloat16"),),
        workers=2,
        servers=2,
    ),
}


@dataclass(frozen=True)
class BenchOptions:
    workload: Workload
    stages: int = 1
    iters: int = 1000
    warmup: int = 100
    rounds: int = 10
    progress: str = "polling"
    device: str = "cpu"
    pin: bool = True
    contenders: tuple[str, ...] = ("stepmesh", "ucxx", "gloo")
    traces: bool = True
    round_timeout_s: float = 300.0
    need_event: bool = True  # push_pull's need_event (matters for device tensors only)


@dataclass
class ContenderResult:
    name: str
    latencies_us: list[float] = field(default_factory=list)
    seconds: float = 0.0
    ops: int = 0
    note: str = ""

    def stats(self) -> dict[str, float]:
        lat = sorted(self.latencies_us)
        if not lat:
            return {}

        def q(p: float) -> float:
            return lat[min(len(lat) - 1, int(p * len(lat)))]

        return {
            "p50_us": statistics.median(lat),
            "p90_us": q(0.90),
            "p99_us": q(0.99),
            "max_us": lat[-1],
            "mean_us": statistics.fmean(lat),
            "ops_per_s": self.ops / self.seconds if self.seconds else 0.0,
            "samples": len(lat),
        }


@dataclass
class BenchResult:
    options: BenchOptions
    contenders: dict[str, ContenderResult]
    traces: dict[str, dict[str, float]]  # server -> stage -> median us
    ucx_options: dict[str, str] = field(default_factory=dict)  # of stepmesh's data workers and the ucxx floor

    def to_json(self) -> dict[str, Any]:
        base = self.contenders.get("stepmesh")
        out: dict[str, Any] = {
            "schema": "stepmesh-bench/1",
            "workload": asdict(self.options.workload),
            "options": {k: v for k, v in asdict(self.options).items() if k != "workload"},
            "contenders": {},
            "trace_breakdown_us": self.traces,
            "ucx_options": self.ucx_options,
        }
        for name, c in self.contenders.items():
            st = c.stats()
            entry: dict[str, Any] = {
                "stats": st, "note": c.note, "seconds": c.seconds, "ops": c.ops, "latencies_us": c.latencies_us,
            }
            if base is not None and st and base.stats() and name != "stepmesh":
                entry["stepmesh_p50_ratio"] = base.stats()["p50_us"] / st["p50_us"]
            out["contenders"][name] = entry
        return out

    @classmethod
    def from_json(cls, doc: Any) -> BenchResult:
        """The result that :meth:`to_json` wrote (schema ``stepmesh-bench/1``).

        Raises:
            ValueError: not such a document, or a field is missing or malformed.
        """
        if not isinstance(doc, dict) or doc.get("schema") != "stepmesh-bench/1":
            found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
            raise ValueError(f"not a stepmesh bench result (schema stepmesh-bench/1 expected, found {found!r})")
        try:
            wl = doc["workload"]

            def specs(items: Any) -> tuple[TensorSpec, ...]:
                return tuple(TensorSpec(tuple(int(d) for d in t["shape"]), str(t["dtype"])) for t in items)

            workload = Workload(str(wl["name"]), specs(wl["push"]), specs(wl["pull"]), int(wl["workers"]), int(wl["servers"]))
            known = BenchOptions.__dataclass_fields__
            given = {k: v for k, v in doc["options"].items() if k in known and k != "workload"}
            if "contenders" in given:
                given["contenders"] = tuple(given["contenders"])
            options = BenchOptions(workload=workload, **given)
            contenders = {}
            for name, entry in doc["contenders"].items():
                lat = [float(x) for x in entry["latencies_us"]]
                st = entry.get("stats") or {}
                # files written before "seconds"/"ops" were stored: the rate from the stats
                ops = int(entry.get("ops", st.get("samples", len(lat))))
                rate = st.get("ops_per_s", 0.0)
                seconds = float(entry.get("seconds", ops / rate if rate else 0.0))
                contenders[name] = ContenderResult(name, lat, seconds, ops, str(entry.get("note", "")))
            traces = {str(k): {str(n): float(v) for n, v in stages.items()} for k, stages in doc["trace_breakdown_us"].items()}
            ucx = {str(k): str(v) for k, v in doc.get("ucx_options", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"malformed stepmesh bench result: {type(e).__name__}: {e}") from e
        return cls(options, contenders, traces, ucx)


# --------------------------------------------------------------- children
def _data_options() -> dict[str, str]:
    """The UCX options of stepmesh's data workers in this environment (the floor runs with them too).

    Raises:
        ConfigError: a STEPMESH_*/DMLC_* variable is invalid (the mesh would refuse it as well).
    """
    from .config import Config
    from .node import data_ucx_options

    return data_ucx_options(Config.from_env())


def _pin(core: int | None) -> None:
    if core is not None and hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {allowed[core % len(allowed)]})


def _serve_commands(conn: Any, step: Callable[[int], Any]) -> None:
    """Answer ("run", n) commands with step(n) until ("stop",)."""
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        conn.send(step(msg[1]))


def _serve_ping_pong(conn: Any, one: Callable[[], None]) -> None:
    """A baseline's child: one exchange to wire up, then timed rounds of ``one()`` on command."""
    one()

    def run(n: int) -> dict[str, Any]:
        lat = []
        t_begin = time.perf_counter_ns()
        for _ in range(n):
            t0 = time.perf_counter_ns()
            one()
            lat.append(time.perf_counter_ns() - t0)
        return {"lat": lat, "seconds": (time.perf_counter_ns() - t_begin) / 1e9}

    conn.send("ready")
    _serve_commands(conn, run)


def _stepmesh_node(ctx: Any) -> None:
    import torch

    import stepmesh as f

    opts: BenchOptions = ctx.args["options"]
    conn = ctx.args["conns"][f"{ctx.role}-{ctx.group}-{ctx.rank}"]
    wl = opts.workload
    dev = opts.device
    f.init()
    node = f._node
    if ctx.role == "server":
        answers = [t.make(dev, 7) for t in wl.pull]
        workers = list(range(node.num_workers))
        for i, t in enumerate(wl.push):  # one registered chunk per (worker, stage) of each key
            pool = torch.empty(t.nbytes * len(workers) * opts.stages, dtype=torch.uint8, device=dev)
            f.register_recv_buffer(pool, workers, [i + 1000 * s for s in range(opts.stages)])

        def serve(n: int) -> str:
            for _ in range(n):
                for handle, _tensors, _keys in f.get_batch():
                    f.respond(answers, handle)
            node.flush()  # the last answers must arrive while this waits for the next round
            return "done"

        conn.send("ready")
        _serve_commands(conn, serve)
    else:
        servers = node.num_servers
        stages = [
            (
                [t.make(dev, i) for i, t in enumerate(wl.push)],
                [k + 1000 * s for k in range(len(wl.push))],
                [t.make(dev) for _ in range(servers) for t in wl.pull],
                [k + 1000 * s for _ in range(servers) for k in range(len(wl.pull))],
            )
            for s in range(opts.stages)
        ]

        def issue(s: int) -> tuple[int, int, int]:
            push, pkeys, pull, qkeys = stages[s]
            t0 = time.perf_counter_ns()
            return f.push_pull(push, pkeys, pull, qkeys, need_event=opts.need_event), t0, s

        def run(n: int) -> dict[str, Any]:
            # A rolling pipeline, as an attention instance runs its micro-batches:
            # the oldest stage is waited for and at once sent again, so `stages`
            # push_pulls stay in flight until the last ones drain.
            lat: list[int] = []
            done: list[int] = []
            t_begin = time.perf_counter_ns()
            in_flight = deque(issue(s) for s in range(min(opts.stages, n)))
            issued = len(in_flight)
            while in_flight:
                h, t0, s = in_flight.popleft()
                f.wait(h)
                lat.append(time.perf_counter_ns() - t0)
                done.append(h)
                if issued < n:
                    in_flight.append(issue(s))
                    issued += 1
            seconds = (time.perf_counter_ns() - t_begin) / 1e9
            # Traces are read once the round is timed (stepmesh keeps the last 4096 push_pulls').
            traces = [[f.fetch_trace(x) for x in f.get_all_handlers(h)[1:]] for h in done[-4096:]] if opts.traces else []
            return {"lat": lat, "seconds": seconds, "traces": traces}

        conn.send("ready")
        _serve_commands(conn, run)
    f.stop()


def _ucxx_child(role: str, opts: BenchOptions, conn: Any, core: int | None) -> None:
    _pin(core)
    from . import transport as T

    wl = opts.workload
    tp = T.Transport(_data_options(), opts.progress)
    conn.send(tp.address)
    ep = tp.connect(conn.recv())
    import torch

    n_send = wl.push_bytes if role == "client" else wl.pull_bytes
    n_recv = wl.pull_bytes if role == "client" else wl.push_bytes
    if opts.device.startswith("cuda") and _has("cupy"):  # the reference floor: cupy buffers
        import cupy

        send_t, recv_t = cupy.zeros(n_send, dtype=cupy.uint8), cupy.zeros(n_recv, dtype=cupy.uint8)
        send_b, recv_b = T.wrap(send_t), T.wrap(recv_t)
    else:
        from ._tensors import as_buffer

        send_t = torch.zeros(n_send, dtype=torch.uint8, device=opts.device)
        recv_t = torch.zeros(n_recv, dtype=torch.uint8, device=opts.device)
        send_b, recv_b = as_buffer(send_t), as_buffer(recv_t)
    out_tag, in_tag = (tp.tag(1), tp.tag(2)) if role == "client" else (tp.tag(2), tp.tag(1))
    forever = time.monotonic() + 3600
    progress = tp.worker.progress

    def until(done: Callable[[], bool]) -> None:
        if tp.mode == "polling":  # as ucxx's own users busy-poll
            while not done():
                progress()
        else:
            tp.progress_until(done, forever)

    def one() -> None:
        if role == "client":
            r = ep.tag_recv(recv_b, in_tag)
            s = ep.tag_send(send_b, out_tag)
        else:
            r = ep.tag_recv(recv_b, in_tag)
            until(lambda: r.completed)
            s = ep.tag_send(send_b, out_tag)
        until(lambda: r.completed and s.completed)

    _serve_ping_pong(conn, one)
    tp.close()


def _protocol_child(role: str, opts: BenchOptions, conn: Any, core: int | None) -> None:
    """stepmesh's messages for this workload, and nothing else: what any implementation of its protocol could reach.

    The same messages as a 1 x 1 push_pull, with the same sizes, tags, masks,
    copies and direct libucp calls: the request header with the inline pushes
    gathered behind it, large pushes as their own messages received once the
    header is in; the response header with the inline answers copied behind it
    (and scattered into a single small answer's pull tensor), large answers
    into receives posted in advance. None of the bookkeeping around them
    (signatures, records, checks, traces).
    """
    _pin(core)
    from ctypes import memmove

    from . import protocol as P
    from . import transport as T
    from ._tensors import HostBuffer
    from ._ucp import IoVec

    wl = opts.workload
    tp = T.Transport(_data_options(), opts.progress)
    conn.send(tp.address)
    endpoint = tp.connect(conn.recv())
    ep = endpoint.handle
    ops = tp.ops
    progress = tp.worker.progress
    client = role == "client"
    on_host = not opts.device.startswith("cuda")
    # The worker owns the pushes and the pull buffers; the server the push buffers and the answers.
    mine = [t.make(opts.device, 1) for t in (wl.push if client else wl.pull)]
    theirs = [t.make(opts.device) for t in (wl.pull if client else wl.push)]
    out_fits = P.inline_split([t.nbytes for t in mine], on_host)
    in_fits = P.inline_split([t.nbytes for t in theirs], on_host)
    n_answers = len(wl.pull)
    hsize = P.request_header_size([t.shape for t in wl.push], n_answers)
    answer_struct = P.response_struct(n_answers)
    answer_sizes = [t.nbytes for t in wl.pull]
    resp_pos = answer_struct.size  # an answered response's header
    out_head, in_head = (hsize, resp_pos) if client else (resp_pos, hsize)

    def small(ts: list[Any], fits: tuple[bool, ...]) -> list[tuple[int, int]]:
        return [(t.data_ptr(), t.nbytes) for t, f in zip(ts, fits) if f and t.nbytes]

    def behind(base: int, pieces: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """(address in the buffer, tensor address, bytes) of tensors laid back to back from ``base``."""
        out = []
        for ptr, n in pieces:
            out.append((base, ptr, n))
            base += n
        return out

    small_out, small_in = small(mine, out_fits), small(theirs, in_fits)
    out_buf = HostBuffer(out_head + sum(n for _, n in small_out))
    out_len = out_buf.raw.size
    out_iov, copies_out = None, []
    if client and small_out:  # the worker has UCX gather its small pushes behind the header
        out_iov = IoVec([(out_buf.ptr, out_head), *small_out])
    elif small_out:  # the server copies its small answers in behind the header
        copies_out = behind(out_buf.ptr + out_head, small_out)
    scattered = P.scattered_answer([t.nbytes for t in theirs], in_fits) if client else -1
    if scattered >= 0:
        in_buf = HostBuffer(resp_pos)
        in_iov = IoVec([(in_buf.ptr, resp_pos), (theirs[scattered].data_ptr(), theirs[scattered].nbytes)])
        copies_in = []
    else:
        in_buf = HostBuffer(P.response_header_size(n_answers) + P.INLINE_MAX if client else P.HEADER_MAX + P.INLINE_MAX)
        in_iov = None
        copies_in = behind(in_buf.ptr + in_head, small_in)
    sends = [(t.data_ptr(), t.nbytes, i) for i, (t, f) in enumerate(zip(mine, out_fits)) if not f]
    recvs = [(t.data_ptr(), t.nbytes, i) for i, (t, f) in enumerate(zip(theirs, in_fits)) if not f]
    kinds = (P.TAG_REQUEST, P.TAG_PUSH, P.TAG_RESPONSE, P.TAG_PULL)
    out_kind, out_bulk, in_kind, in_bulk = kinds if client else kinds[2:] + kinds[:2]
    me, peer = (1, 2) if client else (2, 1)
    out_tag, out_bulk_tag = P.make_tag(out_kind, me), P.make_tag(out_bulk, me)
    in_tag, in_bulk_tag = P.make_tag(in_kind, peer), P.make_tag(in_bulk, peer)
    send, recv = ops.send, ops.recv
    state: dict[str, Any] = {"seq": 0, "slot": None}
    if client:  # the worker's request header is built once; a call stamps its sequence number
        P.REQ_FIXED.pack_into(out_buf.raw, 0, P.DATA_VERSION, P.FLAG_INLINE, len(mine), 1, n_answers, 0)

    def wait(reqs: list[Any]) -> None:
        for r in reqs:
            while not r.completed:
                progress()

    def post_out(bits: int) -> list[Any]:
        tag = out_tag | bits
        sent = [send(ep, out_buf.ptr, out_len, tag) if out_iov is None else ops.send_iov(ep, out_iov, tag)]
        return sent + [send(ep, ptr, n, out_bulk_tag | bits | i) for ptr, n, i in sends]

    def one_client(seq: int, bits: int) -> None:
        P.SEQ_STRUCT.pack_into(out_buf.raw, P.SEQ_OFFSET, seq)
        sent = post_out(bits)
        tag = in_tag | bits
        got = [recv(in_buf.ptr, in_buf.raw.size, tag) if in_iov is None else ops.recv_iov(in_iov, tag)]
        got += [recv(ptr, n, in_bulk_tag | bits | i) for ptr, n, i in recvs]
        wait(got)
        wait(sent)
        for at, dst, n in copies_in:
            memmove(dst, at, n)

    def one_server(seq: int, bits: int) -> None:
        slot = state["slot"] or recv(in_buf.ptr, in_buf.raw.size, in_tag, P.TAG_MASK_KIND_NODE)
        wait([slot])
        for at, dst, n in copies_in:
            memmove(dst, at, n)
        wait([recv(ptr, n, in_bulk_tag | bits | i) for ptr, n, i in recvs])
        answer_struct.pack_into(out_buf.raw, 0, P.DATA_VERSION, 0, P.STATUS_OK, n_answers, seq, 0, 0, 0, 0, *answer_sizes)
        for at, src, n in copies_out:
            memmove(at, src, n)
        sent = post_out(bits)
        state["slot"] = recv(in_buf.ptr, in_buf.raw.size, in_tag, P.TAG_MASK_KIND_NODE)
        # Some rendezvous (CUDA IPC) move only while the sender progresses:
        # the answer is seen through here, as stepmesh's server does in get_batch.
        wait(sent)

    def one() -> None:
        seq = state["seq"] = (state["seq"] + 1) & P.SEQ_MASK
        (one_client if client else one_server)(seq, seq << P.SEQ_SHIFT)

    one()
    if theirs and int(theirs[0].reshape(-1)[0].float()) != 1:  # the peer's tensors are filled with 1s
        raise RuntimeError(f"protocol baseline: the {role} received {theirs[0].reshape(-1)[0]!r}, expected 1")
    _serve_ping_pong(conn, one)
    tp.close()


def _nixl_child(role: str, opts: BenchOptions, conn: Any, core: int | None) -> None:
    """NIXL ping-pong: WRITE into the peer's buffer with a notification, the peer answers likewise.

    The progress thread stays off (on small machines it costs milliseconds);
    progress is made by polling the transfer state and the notifications.
    """
    _pin(core)
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARNING")  # its INFO lines would interleave with the table
    try:
        import torch
        from nixl._api import nixl_agent, nixl_agent_config

        wl = opts.workload
        n_send = wl.push_bytes if role == "client" else wl.pull_bytes
        n_recv = wl.pull_bytes if role == "client" else wl.push_bytes
        send_t = torch.zeros(n_send, dtype=torch.uint8, device=opts.device)
        recv_t = torch.zeros(n_recv, dtype=torch.uint8, device=opts.device)
        agent = nixl_agent(f"stepmesh-bench-{role}", nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
        agent.register_memory([send_t, recv_t])
        conn.send(("ok", agent.get_agent_metadata(), agent.get_serialized_descs(agent.get_xfer_descs([recv_t]))))
    except Exception as e:  # reported as the contender's note, not a failed run
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    meta, descs = conn.recv()
    peer = agent.add_remote_agent(meta)
    handle = agent.initialize_xfer("WRITE", agent.get_xfer_descs([send_t]), agent.deserialize_descs(descs), peer, b"n")
    notes = 0  # notifications received and not yet consumed

    def write() -> None:
        agent.transfer(handle)
        while (state := agent.check_xfer_state(handle)) != "DONE":
            if state == "ERR":
                raise RuntimeError("NIXL transfer failed")

    def answered() -> None:
        nonlocal notes
        while not notes:
            notes += sum(len(v) for v in agent.get_new_notifs().values())  # one peer only
        notes -= 1

    def one() -> None:
        if role == "client":
            write()
            answered()
        else:
            answered()
            write()

    _serve_ping_pong(conn, one)
    agent.release_xfer_handle(handle)


def _dist_child(role: str, opts: BenchOptions, conn: Any, core: int | None, store: str) -> None:
    _pin(core)
    import torch
    import torch.distributed as dist

    wl = opts.workload
    backend = "nccl" if opts.device.startswith("cuda") else "gloo"
    rank = 0 if role == "client" else 1
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=2)
    device = f"cuda:{rank}" if opts.device.startswith("cuda") else opts.device  # NCCL: one GPU per rank
    send_t = torch.zeros(wl.push_bytes if rank == 0 else wl.pull_bytes, dtype=torch.uint8, device=device)
    recv_t = torch.zeros(wl.pull_bytes if rank == 0 else wl.push_bytes, dtype=torch.uint8, device=device)
    sync = torch.cuda.synchronize if opts.device.startswith("cuda") else (lambda: None)

    def one() -> None:
        if rank == 0:
            dist.send(send_t, 1)
            dist.recv(recv_t, 1)
        else:
            dist.recv(recv_t, 0)
            dist.send(send_t, 0)
        sync()

    _serve_ping_pong(conn, one)
    dist.destroy_process_group()


# ----------------------------------------------------------------- driver
@dataclass
class _Contender:
    name: str
    drivers: list[Any]  # connections that measure (their results are kept)
    helpers: list[Any]  # connections that only answer
    processes: list[Any]
    per_round: Callable[[int], int]  # iterations -> commands for helpers
    mesh: Any = None


def _recv(conn: Any, timeout: float, what: str, mesh: Any = None) -> Any:
    """The next message on ``conn``; fails early if a process of ``mesh`` died."""
    deadline = time.monotonic() + timeout
    while not conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
        if mesh is not None:
            mesh.check()
        if time.monotonic() >= deadline:
            raise TimeoutError(f"bench: no answer from {what} within {timeout:.0f} s")
    return conn.recv()


def _start_pair(name: str, target: Callable[..., None], opts: BenchOptions, *extra: Any) -> _Contender:
    cores = (0, 1) if opts.pin else (None, None)
    conns, procs = [], []
    for role, core in zip(("client", "server"), cores):
        mine, theirs = _SPAWN.Pipe()
        p = _SPAWN.Process(target=target, args=(role, opts, theirs, core, *extra), daemon=True, name=f"{name}-{role}")
        p.start()
        conns.append(mine)
        procs.append(p)
    if name in ("ucxx", "protocol", "nixl"):  # exchange what reaches each side: worker addresses; NIXL metadata + descriptors
        a = _recv(conns[0], _READY_TIMEOUT_S, f"{name} client")
        b = _recv(conns[1], _READY_TIMEOUT_S, f"{name} server")
        if name == "nixl":  # ("ok", ...) or ("error", why)
            if a[0] != "ok" or b[0] != "ok":
                for p in procs:
                    p.kill()
                    p.join(timeout=5)
                raise _Unavailable(a[1] if a[0] != "ok" else b[1])
            a, b = a[1:], b[1:]
        conns[0].send(b)
        conns[1].send(a)
    return _Contender(name, [conns[0]], [conns[1]], procs, lambda n: n)


class _Unavailable(Exception):
    """A baseline that cannot run here (the reason becomes its note)."""


def _start_stepmesh(opts: BenchOptions) -> _Contender:
    from .testing import spawn_mesh

    wl = opts.workload
    names = [f"server-0-{r}" for r in range(wl.servers)] + [f"worker-0-{r}" for r in range(wl.workers)]
    pipes = {n: _SPAWN.Pipe() for n in names}
    env = {"STEPMESH_PROGRESS": opts.progress, "UCX_WARN_UNUSED_ENV_VARS": "n"}

    def node_env(role: str, rank: int, group: int) -> dict[str, str]:
        if not opts.pin:
            return {}
        core = rank if role == "worker" else wl.workers + rank
        return {"STEPMESH_BIND_CPU_CORE": "1", "STEPMESH_CPU_START_OFFSET": str(core)}

    mesh = spawn_mesh(
        _stepmesh_node,
        num_workers=wl.workers,
        num_servers=wl.servers,
        timeout=24 * 3600,
        env=env,
        node_env=node_env,
        args={"options": opts, "conns": {n: p[1] for n, p in pipes.items()}},
    )
    drivers = [pipes[n][0] for n in names if n.startswith("worker")]
    helpers = [pipes[n][0] for n in names if n.startswith("server")]
    c = _Contender("stepmesh", drivers, helpers, [], lambda n: n, mesh)
    return c


def run_bench(opts: BenchOptions, on_round: Callable[[int], None] | None = None) -> BenchResult:
    """Run every contender, ``opts.rounds`` rounds each, interleaved.

    Args:
        on_round: called after every contender's round (for a progress bar).

    Raises:
        TimeoutError: a contender stopped answering.
        stepmesh.testing.MeshError: a mesh process failed.
    """
    results = {name: ContenderResult(name) for name in opts.contenders}
    contenders: list[_Contender] = []
    tmp = tempfile.TemporaryDirectory(prefix="stepmesh-bench-")
    try:
        for name in opts.contenders:
            if name == "stepmesh":
                contenders.append(_start_stepmesh(opts))
            elif name == "ucxx":
                contenders.append(_start_pair("ucxx", _ucxx_child, opts))
            elif name == "protocol":
                contenders.append(_start_pair("protocol", _protocol_child, opts))
            elif name in ("gloo", "torch"):
                why = _dist_unavailable(opts)
                if why:
                    results[name].note = f"not run: {why}"
                else:
                    contenders.append(_start_pair(name, _dist_child, opts, os.path.join(tmp.name, f"{name}.store")))
            elif name == "nixl":
                if not _has("nixl"):
                    results[name].note = "not run: NIXL is not installed (pip install nixl)"
                    continue
                try:
                    contenders.append(_start_pair("nixl", _nixl_child, opts))
                except _Unavailable as e:
                    results[name].note = f"not run: NIXL failed to start: {e}"
            else:
                raise ValueError(f"unknown contender {name!r}")
        for c in contenders:
            for conn in c.drivers + c.helpers:
                _recv(conn, _READY_TIMEOUT_S, f"{c.name} start-up", c.mesh)
        per_round = max(1, opts.iters // opts.rounds)
        for r in range(opts.rounds + 1):  # round 0 is the warm-up
            n = opts.warmup if r == 0 else per_round
            for c in contenders:
                for conn in c.helpers:
                    conn.send(("run", n))
                for conn in c.drivers:
                    conn.send(("run", n))
                try:
                    outs = [_recv(conn, opts.round_timeout_s, c.name, c.mesh) for conn in c.drivers]
                    for conn in c.helpers:
                        _recv(conn, opts.round_timeout_s, c.name, c.mesh)
                except TimeoutError as e:
                    if c.mesh is not None:  # say where every process is stuck
                        raise TimeoutError(f"{e}\n{c.mesh.dump_stacks()}") from None
                    raise
                if r == 0:
                    continue
                res = results[c.name]
                first = outs[0]
                res.latencies_us.extend(x / 1000 for x in first["lat"])
                res.seconds += first["seconds"]
                res.ops += len(first["lat"])
                if "traces" in first:
                    res.__dict__.setdefault("_traces", []).extend(first["traces"])
                if on_round is not None:
                    on_round(1)
        for c in contenders:
            for conn in c.drivers + c.helpers:
                conn.send(("stop",))
        for c in contenders:
            if c.mesh is not None:
                c.mesh.join()
            for p in c.processes:
                p.join(timeout=30)
    finally:
        for c in contenders:
            if c.mesh is not None:
                c.mesh.kill()
            for p in c.processes:
                if p.is_alive():
                    p.kill()
                p.join(timeout=5)
        tmp.cleanup()
    traces = _breakdown(results["stepmesh"].__dict__.pop("_traces", [])) if "stepmesh" in results else {}
    return BenchResult(opts, results, traces, _data_options())


def _dist_unavailable(opts: BenchOptions) -> str:
    """Why torch.distributed cannot run this workload here ('' when it can)."""
    if not opts.device.startswith("cuda"):
        return ""
    import torch

    if torch.cuda.device_count() < 2:
        return "NCCL needs each rank on its own GPU and only one is visible"
    return ""


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


_STAGES = (
    ("request send", 0, 1),
    ("request network", 1, 2),
    ("server queue+compute", 2, 4),
    ("response send", 4, 5),
    ("response network+wait", 5, 6),
)


def _breakdown(traces: list[list[list[int]]]) -> dict[str, dict[str, float]]:
    """Median microseconds of each stage of the round trip, per server."""
    out: dict[str, dict[str, float]] = {}
    if not traces:
        return out
    for s in range(len(traces[0])):
        out[f"server {s}"] = {
            name: statistics.median((op[s][b] - op[s][a]) / 1000 for op in traces) for name, a, b in _STAGES
        }
    return out


def summarize(result: BenchResult) -> str:
    """A plain-text table of every contender (and the trace breakdown)."""
    base = result.contenders.get("stepmesh")
    bstats = base.stats() if base else {}
    wl = result.options.workload
    lines = [
        f"workload {wl.name}: {wl.workers} worker(s) x {wl.servers} server(s), push {wl.push_bytes} B, "
        f"pull {wl.pull_bytes} B per server, {result.options.stages} stage(s) in flight, "
        f"progress {result.options.progress}, device {result.options.device}"
        + ("" if result.options.need_event else ", need_event=False"),
        "UCX options (stepmesh's data workers and the ucxx floor): "
        + (", ".join(f"{k}={v}" for k, v in result.ucx_options.items()) or "not recorded"),
        f"{'contender':<10} {'p50 us':>9} {'p90 us':>9} {'p99 us':>9} {'max us':>9} {'ops/s':>9} {'stepmesh/x p50':>15}",
    ]
    for name, c in result.contenders.items():
        st = c.stats()
        if not st:
            lines.append(f"{name:<10} {c.note or 'no data'}")
            continue
        ratio = f"{bstats['p50_us'] / st['p50_us']:.2f}" if bstats and name != "stepmesh" else "-"
        lines.append(
            f"{name:<10} {st['p50_us']:9.1f} {st['p90_us']:9.1f} {st['p99_us']:9.1f} {st['max_us']:9.1f} "
            f"{st['ops_per_s']:9.0f} {ratio:>15}"
        )
    if result.traces:
        lines.append("stepmesh round trip by stage (median us):")
        names = [n for n, _, _ in _STAGES]
        lines.append(f"{'':<10}" + "".join(f"{n:>24}" for n in names))
        for server, stages in result.traces.items():
            lines.append(f"{server:<10}" + "".join(f"{stages[n]:24.1f}" for n in names))
    return "\n".join(lines)


def write_json(result: BenchResult, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(result.to_json(), fh, indent=1)


def read_json(path: str) -> BenchResult:
    """A result saved with ``--json`` (to print or plot it on another machine).

    Raises:
        OSError: the file cannot be read.
        ValueError: it is not a stepmesh bench result.
    """
    with open(path) as fh:
        try:
            doc = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON: {e}") from e
    return BenchResult.from_json(doc)


def plot(result: BenchResult, path: str) -> None:
    """Latency CDF of every contender (needs matplotlib).

    Raises:
        RuntimeError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from e
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, c in result.contenders.items():
        lat = sorted(c.latencies_us)
        if not lat:
            continue
        ys = [(i + 1) / len(lat) for i in range(len(lat))]
        ax.plot(lat, ys, label=f"{name} (p50 {statistics.median(lat):.1f} us)")
    wl = result.options.workload
    ax.set_xscale("log")
    ax.set_xlabel("round trip (us, log scale)")
    ax.set_ylabel("fraction of round trips")
    opts = result.options
    ax.set_title(
        f"{wl.name}: {wl.workers}x{wl.servers}, {opts.stages} stage(s), {opts.progress}, {opts.device}"
        + ("" if opts.need_event else ", need_event=False")
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
