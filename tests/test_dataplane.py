"""push_pull / get_batch / respond between real processes over UCX, called the way connectors call them.

Every test whose body makes sense on a GPU is parametrized by device: ``cpu``
runs everywhere (CI), ``cuda`` runs on a machine with a GPU (``-m gpu``) and is
skipped with the reason elsewhere. The bodies are the same: answers computed on
the current stream with no synchronize, buffers reused the moment a call
returns, several calls in flight, rendezvous-sized rows.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import stepmesh as f
from stepmesh.data import wire as W
from stepmesh.testing import NodeContext, run_mesh

from .conftest import DEVICES, mesh_env

SMALL = 64  # elements: travels inline with the header
LARGE = 300_000  # elements: travels by rendezvous into the destination


def _mesh(target, device: str = "cpu", **kw):
    kw["env"] = mesh_env(device, kw.get("env"))
    kw.setdefault("timeout", 120 if device == "cpu" else 240)
    kw["args"] = {"device": device, **(kw.get("args") or {})}
    results = run_mesh(target, **kw)
    assert results.pop("scheduler") is None
    return results


def _dev(ctx: NodeContext) -> str:
    return ctx.args["device"]


def _busy(device: str, cycles: int = 20_000_000) -> None:
    """Queue GPU work ahead of what follows (nothing on the CPU): a race shows instead of hiding."""
    if device == "cuda":
        torch.cuda._sleep(cycles)


# ------------------------------------------------------------- the seed's test
def _seed_sum(ctx: NodeContext) -> int:
    """StepMesh's first test: push 3 tensors, pull 1, the server answers their sum."""
    dev = _dev(ctx)
    f.init()
    checked = 0
    if ctx.role == "worker":
        for n in (SMALL, LARGE):
            push = [torch.rand(n, device=dev) for _ in range(3)]
            pull = [torch.zeros(n, device=dev)]
            h = f.push_pull(push, [0, 1, 2], pull, [3])
            f.wait(h)
            assert pull[0].device == push[0].device
            assert torch.allclose(pull[0], push[0] + push[1] + push[2])
            checked += 1
    else:
        for _ in range(2):
            (handle, tensors, keys), = f.get_batch()
            assert keys == [0, 1, 2] and all(t.device.type == dev for t in tensors)
            f.respond([tensors[0] + tensors[1] + tensors[2]], handle)
            checked += 1
    f.stop()
    return checked


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device", DEVICES)
def test_seed_sum(device):
    assert _mesh(_seed_sum, device) == {"server-0-0": 2, "worker-0-0": 2}


# ------------------------------------------------ every byte, as connectors call
ANSWER_MODES = ("respond", "respond_event", "respond_vec", "reused_buffer")
EXACT_DTYPES = (torch.bfloat16, torch.float8_e4m3fn, torch.int32)
SENTINEL = -3


def _rows(rank: int, rnd: int, stage: int) -> int:
    return 1 + (rank * 37 + rnd * 11 + stage * 23) % 64  # 1..64 tokens: dynamic, different per worker


def _payload(rows: int, width: int, dtype: torch.dtype, seed: int, device: str) -> torch.Tensor:
    """Made on the device by kernels queued right before the call that sends it."""
    base = torch.arange(rows * width, device=device, dtype=torch.int64).reshape(rows, width)
    return ((base * 7 + seed * 13) % 97 - 48).to(torch.float32).to(dtype)


def _answer(x: torch.Tensor, s: int, w: int) -> torch.Tensor:
    """What server ``s`` answers worker ``w`` (both sides compute it the same way: bit-exact)."""
    return (x.float() * (s + 1) + w).to(x.dtype)


def _bytes_as(raw: torch.Tensor, dtype: torch.dtype, rows: int, width: int) -> torch.Tensor:
    """The first rows x width elements of ``dtype`` in a reused byte buffer."""
    n = rows * width * torch.empty(0, dtype=dtype).element_size()
    return raw[:n].view(dtype).view(rows, width)


def _cat(outs: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.cat on rows, through bytes (cat has no kernels for every dtype; its bytes are the same)."""
    rows = sum(o.shape[0] for o in outs)
    width, dtype = outs[0].shape[1], outs[0].dtype
    raw = torch.cat([o.view(torch.uint8) for o in outs], out=None if out is None else out.view(torch.uint8))
    return raw.view(dtype).view(rows, width)


def _exact(ctx: NodeContext) -> int:
    """3 stages in flight waited out of order, dynamic token counts, every answer mode, every byte checked."""
    dev = _dev(ctx)
    rounds = ctx.args["rounds"]
    f.init()
    info = f.node_info()
    servers, workers = info.num_servers, info.num_workers
    checked = 0
    plan = [(width, mode, dtype)
            for width in (256, 7168) for mode in ANSWER_MODES for dtype in EXACT_DTYPES[: ctx.args["dtypes"]]]
    if ctx.role == "worker":
        w = info.rank
        sent = [torch.empty(64 * 7168 * 4, dtype=torch.uint8, device=dev) for _ in range(3)]  # reused send buffers
        for width, mode, dtype in plan:
            with_count = mode in ("respond", "respond_event")
            empty = torch.full((64, width), SENTINEL, dtype=torch.float32).to(dtype).view(torch.uint8).to(dev)
            pulls = [[torch.empty(64, width, dtype=dtype, device=dev) for _ in range(servers)] for _ in range(3)]
            counts = [[torch.empty(1, dtype=torch.int32, device=dev) for _ in range(servers)] for _ in range(3)]
            for rnd in range(rounds):
                calls = []
                for stage in range(3):
                    rows = _rows(w, rnd, stage)
                    for p, c in zip(pulls[stage], counts[stage]):  # on the stream: the answers must land after
                        p.view(torch.uint8).copy_(empty)
                        c.fill_(SENTINEL)
                    _busy(dev)
                    x = _payload(rows, width, dtype, rnd * 3 + stage + w, dev)
                    buf = _bytes_as(sent[stage], dtype, rows, width)
                    buf.copy_(x)  # as a connector does: into the stage's send buffer, on the stream
                    outs = [p[:rows] for p in pulls[stage]]
                    push, pkeys, pull, qkeys = [buf], [stage], outs, [1000 + stage] * servers
                    if with_count:
                        count = torch.full((1,), rows, dtype=torch.int32, device=dev)
                        push, pkeys = [buf, count], [stage, 100 + stage]
                        pull = [t for s in range(servers) for t in (outs[s], counts[stage][s])]
                        qkeys = [k for _ in range(servers) for k in (1000 + stage, 2000 + stage)]
                    calls.append((f.push_pull(push, pkeys, pull, qkeys), x, stage, rows))
                for h, x, stage, rows in reversed(calls):  # waited out of order
                    f.wait(h)
                    for s in range(servers):
                        got = pulls[stage][s]
                        expect = _answer(x, s, w)
                        assert torch.equal(got[:rows].view(torch.uint8), expect.view(torch.uint8)), (
                            f"{mode} width {width} {dtype} round {rnd} stage {stage} server {s}: wrong answer"
                        )
                        assert torch.equal(got[rows:].view(torch.uint8), empty[rows:]), (
                            f"{mode}: bytes past a short answer changed"
                        )
                        if with_count:
                            assert int(counts[stage][s]) == rows, (mode, int(counts[stage][s]), rows)
                    checked += 1
    else:
        s = info.rank
        reused = torch.empty(64 * workers * 7168 * 4, dtype=torch.uint8, device=dev)  # one answer buffer, reused
        for width, mode, dtype in plan:
            for _ in range(rounds):
                batches = [f.get_batch() for _ in range(3)]
                for batch in reversed(batches):  # answered out of order
                    _busy(dev)
                    outs = [_answer(ts[0], s, w) for w, (_, ts, _) in enumerate(batch)]
                    handles = [h for h, _, _ in batch]
                    if mode == "respond":
                        for (h, ts, _), out in zip(batch, outs):
                            f.respond([out, ts[1]], h)
                    elif mode == "respond_event":
                        for (h, ts, _), out in zip(batch, outs):
                            f.respond([out, ts[1]], h, need_event=True)
                    elif mode == "respond_vec":
                        f.respond_vec(_cat(outs), [ts[0] for _, ts, _ in batch], handles)
                    else:
                        n = sum(o.shape[0] for o in outs)
                        ret = _cat(outs, out=_bytes_as(reused, dtype, n, width))  # overwritten by the next batch
                        f.respond_vec(ret, [ts[0] for _, ts, _ in batch], handles)
                    checked += 1
    f.stop()
    return checked


@pytest.mark.timeout(600)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (2, 3)], ids=["1x1", "2x2", "2x3"])
def test_every_answer_exact_as_connectors_call(device, shape):
    workers, servers = shape
    cpu = device == "cpu"
    rounds = (2 if workers * servers == 1 else 1) if cpu else 4
    dtypes = (1 if workers * servers > 1 else 3) if cpu else 3
    results = _mesh(_exact, device, num_workers=workers, num_servers=servers, timeout=500,
                    args={"rounds": rounds, "dtypes": dtypes})
    per = 2 * len(ANSWER_MODES) * dtypes * rounds * 3
    assert set(results.values()) == {per}, results


# ------------------------------------------------------- a side stream
def _side_stream(ctx: NodeContext) -> int:
    """Everything on a stream that is not the default one, as vLLM's micro-batch overlap runs: the sends and the
    answers must wait for the work queued there (reading the default stream instead, they would leave at once)."""
    f.init()
    rounds, dt = ctx.args["rounds"], torch.bfloat16
    checked = 0
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        assert torch.cuda.current_stream() == side and side.cuda_stream != 0
        if ctx.role == "worker":
            buf = torch.empty(64, 7168, dtype=dt, device="cuda")  # reused every round
            pull = torch.empty(64, 7168, dtype=dt, device="cuda")
            count = torch.empty(1, dtype=torch.int32, device="cuda")
            for rnd in range(rounds):
                pull.fill_(SENTINEL)
                count.fill_(SENTINEL)
                _busy("cuda")
                x = _payload(64, 7168, dt, rnd, "cuda")
                buf.copy_(x)
                n = torch.full((1,), rnd + 1, dtype=torch.int32, device="cuda")
                f.wait(f.push_pull([buf, n], [0, 1], [pull, count], [10, 11]))
                assert torch.equal(pull.view(torch.uint8), _answer(x, 1, 0).view(torch.uint8)), f"round {rnd}"
                assert int(count) == rnd + 1, (rnd, int(count))
                checked += 1
        else:
            for _ in range(rounds):
                (h, ts, keys), = f.get_batch()
                assert keys == [0, 1]
                _busy("cuda")
                f.respond([_answer(ts[0], 1, 0), ts[1]], h)  # twice the push: not the push, nor a stale answer
                checked += 1
    f.stop()
    return checked


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device", DEVICES[1:])  # streams: a GPU's only
def test_work_on_a_side_stream_is_waited_for(device):
    assert _mesh(_side_stream, device, args={"rounds": 6}) == {"server-0-0": 6, "worker-0-0": 6}


# ------------------------------------------------------- connector pattern
def _connector(ctx: NodeContext) -> int:
    """StepMesh's vLLM connector, written down: per-stage send buffers, torch.cat, one ret_buffer, respond_vec."""
    dev = _dev(ctx)
    layers, stages, hidden = ctx.args["layers"], 3, ctx.args["hidden"]
    f.init()
    info = f.node_info()
    checked = 0
    if ctx.role == "worker":
        w = info.rank
        max_tokens = 32
        send_buffer = [torch.empty(max_tokens, hidden, dtype=torch.bfloat16, device=dev) for _ in range(stages)]
        recv_buffer = [[torch.empty(max_tokens, hidden, dtype=torch.bfloat16, device=dev)
                        for _ in range(info.num_servers)] for _ in range(stages)]
        events = []
        for layer in range(layers):
            for stage in range(stages):
                if layer > 0:  # recv_ffn_output of the previous layer's same stage
                    h, x, st = events.pop(0)
                    f.wait(h)
                    n = x.shape[0]
                    for s in range(info.num_servers):
                        assert torch.equal(recv_buffer[st][s][:n], (x * 2 + 1 + s)), (layer, stage, s)
                    checked += 1
                seq_len = 1 + (layer * 5 + stage * 7 + w) % max_tokens
                _busy(dev, 2_000_000)
                hidden_states = torch.randn(seq_len, hidden, device=dev).to(torch.bfloat16)
                send_buffer[stage][:seq_len].copy_(hidden_states)
                h = f.push_pull([send_buffer[stage][:seq_len]], [stage + w * 1_000_000],
                                [t[:seq_len] for t in recv_buffer[stage]], [stage + 1000] * info.num_servers)
                events.append((h, hidden_states, stage))
        for h, x, st in events:
            f.wait(h)
            for s in range(info.num_servers):
                assert torch.equal(recv_buffer[st][s][: x.shape[0]], x * 2 + 1 + s)
            checked += 1
    else:
        s = info.rank
        ret_buffer = torch.empty(64 * info.num_workers, hidden, dtype=torch.bfloat16, device=dev)
        for _ in range(layers * stages):
            batches = f.get_batch()
            recv = [ts[0] for _, ts, _ in batches]
            merged = torch.cat(recv, dim=0)
            _busy(dev, 2_000_000)
            ffn_output = merged * 2 + 1 + s
            ret_buffer[: ffn_output.shape[0]].copy_(ffn_output)
            split = torch.split(ffn_output, [t.shape[0] for t in recv], dim=0)
            f.respond_vec(ret_buffer, list(split), [h for h, _, _ in batches])
            checked += 1
    f.stop()
    return checked


@pytest.mark.timeout(600)
@pytest.mark.parametrize("device", DEVICES)
def test_connector_pattern_every_answer_right(device):
    layers = 50
    hidden = 7168 if device == "cuda" else 2048
    results = _mesh(_connector, device, num_workers=2, num_servers=1, timeout=500,
                    args={"layers": layers, "hidden": hidden})
    assert set(results.values()) == {layers * 3}, results


# ------------------------------------------------- pushes written right before
def _written_right_before(ctx: NodeContext) -> bool:
    """need_event: data a kernel is still writing is sent once written; the answer likewise."""
    dev = _dev(ctx)
    f.init()
    if ctx.role == "worker":
        for n in (SMALL, LARGE):
            push = [torch.zeros(n, device=dev), torch.zeros(1, dtype=torch.int32, device=dev)]
            pull = [torch.zeros(n, device=dev), torch.zeros(1, dtype=torch.int32, device=dev)]
            _busy(dev, 200_000_000)  # ~0.1 s of GPU work queued before the data is written
            push[0].fill_(5.0)
            push[1].fill_(n)
            h = f.push_pull(push, [0, 1], pull, [0, 1])  # returns at once, sends once the fill is done
            f.wait(h)
            assert torch.all(pull[0] == 7.0) and int(pull[1]) == n + 1, (pull[0][:4], pull[1])
    else:
        for n in (SMALL, LARGE):
            ((h, (t, c), _),) = f.get_batch()
            assert torch.all(t == 5.0) and int(c) == n, (t[:4], c)  # not the zeros there before the fill
            out = torch.zeros(n, device=dev)
            _busy(dev, 200_000_000)
            out.fill_(7.0)
            f.respond([out, c + 1], h)  # sent once the fill is done; out may be reused at once
            out.fill_(-1.0)
    f.stop()
    return True


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device", DEVICES)
def test_data_a_kernel_is_still_writing_is_sent_once_written(device):
    assert all(_mesh(_written_right_before, device).values())


# ----------------------------------------------------------------- M x N
def _mxn(ctx: NodeContext) -> int:
    dev = _dev(ctx)
    f.init()
    info = f.node_info()
    servers = info.num_servers
    rounds = 0
    for n in (SMALL, LARGE):
        if ctx.role == "worker":
            mark = torch.full((n,), float(ctx.rank), device=dev)
            pulls = [torch.zeros(n, device=dev) for _ in range(servers * 2)]
            keys = [1000 * s + j for s in range(servers) for j in range(2)]
            h = f.push_pull([mark, torch.arange(n, dtype=torch.float32, device=dev)], [7, 8], pulls, keys)
            handles = f.get_all_handlers(h)
            assert handles == [h, h + 1, h + 2, h + 3]  # StepMesh's shape: 2 push tensors + 2 pull keys per server
            f.wait(h)
            for s in range(servers):
                for j in range(2):
                    expect = mark + torch.arange(n, device=dev) + 100 * s + 10 * j
                    assert torch.equal(pulls[s * 2 + j], expect), (s, j, pulls[s * 2 + j][:3])
            assert f.get_all_handlers(h) == handles  # after wait too
            traces = [f.fetch_trace(x) for x in handles]
            assert all(len(tr) == 8 for tr in traces) and all(tr == traces[0] for tr in traces)
            per_server = [f.fetch_trace(h, server=s) for s in range(servers)]
            assert traces[0] == max(per_server, key=lambda tr: tr[6])
            assert all(tr[0] <= tr[1] <= tr[6] <= tr[7] for tr in per_server)
        else:
            batch = f.get_batch()
            assert len(batch) == info.num_workers
            for w, (handle, tensors, keys) in enumerate(batch):
                assert keys == [7, 8]
                assert torch.all(tensors[0] == w), "batch not in worker-rank order"
                base = tensors[0] + tensors[1] + 100 * ctx.rank
                f.respond([base, base + 10], handle)
        rounds += 1
    f.stop()
    return rounds


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device", DEVICES)
def test_two_workers_three_servers_route_every_answer(device):
    results = _mesh(_mxn, device, num_workers=2, num_servers=3, timeout=250)
    assert set(results.values()) == {2} and len(results) == 5


# ---------------------------------------------------------------- the lane
def _shape_rounds_worker(dev: str, rounds: int) -> dict:
    """StepMesh's shape (hidden state + int32 count each way) to 2 servers, 3 stages in flight, ``rounds`` times,
    the pull tensors reused every round (cleared once checked: each answer must overwrite every byte); the
    call's plan."""
    pulls = [[torch.empty(LARGE, device=dev), torch.empty(1, dtype=torch.int32, device=dev)] for _ in range(2 * 3)]
    for rnd in range(rounds):
        calls = []
        for stage in range(3):
            _busy(dev, 2_000_000)
            x = torch.full((LARGE,), float(rnd * 3 + stage), device=dev)
            count = torch.full((1,), 1 + rnd * 3 + stage, dtype=torch.int32, device=dev)
            pull = [t for s in range(2) for t in pulls[stage * 2 + s]]
            calls.append((f.push_pull([x, count], [0, 1], pull, [0, 1, 0, 1]), rnd * 3 + stage, stage))
        for h, v, stage in reversed(calls):
            f.wait(h)
            for s in range(2):
                answer, n = pulls[stage * 2 + s]
                assert torch.all(answer == v * 2 + s) and int(n) == v + 1 + s, (rnd, v, s, answer[:2], n)
                answer.fill_(-1)
                n.fill_(-1)
    return f._worker("test")._plan([x, count], [0, 1], pull, [0, 1, 0, 1], True)


def _shape_rounds_server(dev: str, rank: int, rounds: int, host_from: int) -> None:
    """Answer ``_shape_rounds_worker`` (computed on a busy stream), from round ``host_from`` on with host tensors;
    every answer is overwritten the moment respond returns."""
    for rnd in range(rounds):
        for _ in range(3):
            ((h, (t, n), _),) = f.get_batch()
            _busy(dev, 2_000_000)
            answers = [t * 2 + rank, n + rank]
            if rnd >= host_from:
                answers = [a.cpu() for a in answers]
            f.respond(answers, h)
            for a in answers:
                a.fill_(-7)


def _lanes(ctx: NodeContext) -> tuple[int, list[bool], list[list[int]]]:
    """StepMesh's shape, 3 stages in flight, to 2 servers.

    Returns how many servers the node reaches on the lane (workers) or whether
    it has a lane (servers), and, on the worker, which separate pushes of the
    call were planned on the lane and how each server's answers come.
    """
    dev = _dev(ctx)
    f.init()
    node = f._worker("test") if ctx.role == "worker" else f._server("test")
    flags: list[bool] = []
    hows: list[list[int]] = []
    if ctx.role == "worker":
        plan = _shape_rounds_worker(dev, 4)
        flags = [item[3] for item in plan["sep_push"]]
        hows = [[answer[3] for answer in server[3]] for server in plan["servers"]]
        reach = len(node.lane_endpoints)
    else:
        _shape_rounds_server(dev, ctx.rank, 4, host_from=4)
        reach = int(node.data.has_lane)
    f.stop()
    return reach, flags, hows


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lanes", ["everywhere", "worker-only", "one-server"])
def test_small_device_tensors_take_the_lane_only_where_every_server_has_one(device, lanes):
    has = {"everywhere": {("worker", 0), ("server", 0), ("server", 1)},
           "worker-only": {("worker", 0)},
           "one-server": {("worker", 0), ("server", 0)}}[lanes]

    def node_env(role: str, rank: int, group: int) -> dict[str, str]:
        return {"STEPMESH_DEVICE_LANE": "1" if (role, rank) in has else "0", "STEPMESH_ONE_SIDED": "off"}

    results = _mesh(_lanes, device, num_servers=2, node_env=node_env, timeout=250)
    assert results["server-0-0"][0] == (("server", 0) in has) and results["server-0-1"][0] == (("server", 1) in has)
    reach, flags, hows = results["worker-0-0"]
    assert reach == sum(("server", r) in has for r in range(2))
    # the hidden state is large (by rendezvous on the data worker); the count goes on the lane when it is
    # device memory and every server has a lane, else as a message of its own (device) or inline (host)
    on_lane = device == "cuda" and lanes == "everywhere"
    assert flags == ([False, True] if on_lane else [False, False] if device == "cuda" else [False]), flags
    # answers (the core's plan: 1 put in place behind the header, 2 separate, 3 packed, 4 on the lane): on the lane the count comes
    # by itself and the hidden state straight into its tensor; without, device answers come packed
    expect = [2, 4] if on_lane else [3, 3] if device == "cuda" else [2, 1]
    assert hows == [expect, expect], hows


# ------------------------------------------------------------ written answers
def _written(ctx: NodeContext) -> list[list[int]] | tuple[int, int]:
    """StepMesh's shape to 2 servers, 3 stages in flight, the pull tensors reused every round: servers put the
    answers (computed on a busy stream, need_event) straight into them. In the last round the servers answer
    with host tensors: on a GPU those cannot be put into device pulls and go as messages after all. Then one
    call that server 0 refuses while server 1 answers it with host tensors (the worker must still take those
    messages in, or server 1 could never deliver them), and one more that both answer. The worker's plan (how
    each server's answers come), or a server's (answers put, answers sent as messages)."""
    dev = _dev(ctx)
    f.init()
    result: list[list[int]] | tuple[int, int]
    if ctx.role == "worker":
        plan = _shape_rounds_worker(dev, 4)
        result = [[answer[3] for answer in server[3]] for server in plan["servers"]]
        x = torch.full((LARGE,), 5.0, device=dev)
        count = torch.full((1,), 6, dtype=torch.int32, device=dev)
        pull = [torch.empty(LARGE, device=dev) if k % 2 == 0 else torch.empty(1, dtype=torch.int32, device=dev)
                for k in range(4)]
        with pytest.raises(f.PeerError, match="refused"):
            f.wait(f.push_pull([x, count], [0, 1], pull, [0, 1, 0, 1]))
        f.wait(f.push_pull([x, count], [0, 1], pull, [0, 1, 0, 1]))
        for s in range(2):
            assert torch.all(pull[2 * s] == 10.0 + s) and int(pull[2 * s + 1]) == 6 + s, s
    else:
        _shape_rounds_server(dev, ctx.rank, 4, host_from=3)
        ((h, (t, n), _),) = f.get_batch()
        if ctx.rank == 0:
            with pytest.raises(f.ArgumentError):  # an answer longer than the pull tensor: refused
                f.respond([torch.zeros(LARGE + 5, device=dev), n], h)
        else:
            f.respond([(t * 2 + 1).cpu(), (n + 1).cpu()], h)
        ((h, (t, n), _),) = f.get_batch()
        f.respond([t * 2 + ctx.rank, n + ctx.rank], h)
        f.flush(10_000)  # every answer was taken, the refused call's included
        result = f._server("test")._core.written
    f.stop()
    return result


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("progress", ["polling", "blocking", "thread-servers"])
def test_written_answers_are_put_straight_into_the_pull_tensors(device, progress):
    """With STEPMESH_ONE_SIDED (device, the default, on a GPU; all on the CPU, where host memory is written
    too) every answer of StepMesh's shape is written one-sided into the worker's pull tensors: the request
    carries their keys, the server puts and flushes, and only then sends the response header. Answers of another
    kind of memory than the pull tensors go as messages, and land as well. Servers in thread progress mode (which
    map nothing themselves) still write a polling worker's answers."""
    env = {"STEPMESH_ONE_SIDED": "all" if device == "cpu" else "device"}

    def node_env(role: str, rank: int, group: int) -> dict[str, str]:
        mode = progress if progress != "thread-servers" else "thread" if role == "server" else "polling"
        return {"STEPMESH_PROGRESS": mode}

    results = _mesh(_written, device, num_servers=2, env=env, node_env=node_env, timeout=250)
    hows = results["worker-0-0"]
    # the core's plan: 5 written; 1 put in place behind the response header (a host count is inline)
    expect = [5, 5] if device == "cuda" else [5, 1]
    assert hows == [expect, expect], hows
    written = expect.count(5)
    host = 0 if device == "cpu" else 1  # host answers are put on the CPU, sent as messages on a GPU
    for s in range(2):
        put, moved = results[f"server-0-{s}"]
        # 4 rounds of 3 calls, the last round's answers host memory; then server 1 answers the call server 0
        # refuses with host memory; then one call both answer
        host_calls = 3 + s
        calls = 4 * 3 + s + 1
        expect_moved = host_calls * written * host
        assert (put, moved) == (calls * written - expect_moved, expect_moved), (s, put, moved)


# ------------------------------------------------------- a slow server shows
def _slow_server(ctx: NodeContext) -> str:
    f.init()
    if ctx.role == "worker":
        pulls = [torch.zeros(4) for _ in range(3)]
        h = f.push_pull([torch.ones(4)], [0], pulls, [0, 0, 0])
        f.wait(h)
        subs = [f.fetch_trace(h, server=s) for s in range(3)]
        late = subs[0][6] - max(subs[1][6], subs[2][6])  # server 0 answered 0.3 s after the others
        assert late > 0.15e9, [tr[6] for tr in subs]
        assert f.fetch_trace(h) == subs[0]
    else:
        (h, (t,), _), = f.get_batch()
        if ctx.rank == 0:
            time.sleep(0.3)
        f.respond([t], h)
    f.stop()
    return "ok"


@pytest.mark.timeout(120)
def test_each_server_trace_says_when_its_own_answer_arrived():
    results = _mesh(_slow_server, num_servers=3, timeout=90)
    assert set(results.values()) == {"ok"}, results


# ---------------------------------------------------------- stages in flight
def _stages(ctx: NodeContext) -> int:
    dev = _dev(ctx)
    f.init()
    n_stages, rounds = 3, 4
    lengths = [LARGE, 17, LARGE // 3]
    if ctx.role == "worker":
        buf = torch.arange(LARGE, dtype=torch.float32, device=dev)
        for _ in range(rounds):
            handles, pulls = [], []
            for s in range(n_stages):
                out = torch.full((LARGE,), -1.0, device=dev)
                pulls.append((out, buf[: lengths[s]] * 2 + s))
                handles.append(f.push_pull([buf[: lengths[s]]], [s], [out], [100 + s]))  # slices: dynamic shapes
            for h, (out, expect) in zip(reversed(handles), reversed(pulls)):
                f.wait(h)
                assert torch.equal(out[: expect.numel()], expect) and torch.all(out[expect.numel() :] == -1)
    else:
        for _ in range(rounds):
            batches = [f.get_batch() for _ in range(n_stages)]
            for batch in reversed(batches):  # answer out of order
                (handle, (t,), (key,)), = batch
                assert t.shape[0] == lengths[key]
                f.respond([t * 2 + key], handle)
    f.stop()
    return rounds


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device", DEVICES)
def test_three_stages_in_flight_answered_out_of_order(device):
    assert set(_mesh(_stages, device).values()) == {4}


def _in_sending_order(ctx: NodeContext) -> int | list[tuple[int, int, int]]:
    """Requests alternate between rendezvous-sized and inline pushes, 3 in flight: a small one must not overtake."""
    dev = _dev(ctx)
    n_calls = 60
    f.init()
    if ctx.role == "worker":
        pending = []
        for i in range(n_calls):
            n = LARGE if i % 3 == 0 else SMALL
            x = torch.full((n,), float(i), device=dev)
            y = torch.empty(1, device=dev)
            pending.append((f.push_pull([x], [i % 3], [y], [i % 3]), y, i))
            if len(pending) == 3:
                h, y, j = pending.pop(0)
                f.wait(h)
                assert y.item() == j
        for h, _, _ in pending:
            f.wait(h)
        out: int | list[tuple[int, int, int]] = n_calls
    else:
        out = []
        for k in range(n_calls):
            batch = f.get_batch()
            for w, (_, ts, keys) in enumerate(batch):
                got = int(ts[0][0].item())
                if got != k or keys != [k % 3]:
                    out.append((w, k, got))
            for h, ts, _ in batch:
                f.respond([ts[0][:1]], h)
    f.stop()
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device", DEVICES)
def test_each_workers_requests_are_served_in_the_order_it_sent_them(device):
    results = _mesh(_in_sending_order, device, num_workers=2, num_servers=1)
    assert results.pop("server-0-0") == [], "requests served out of their worker's order (worker, expected, got)"
    assert results == {"worker-0-0": 60, "worker-0-1": 60}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["polling", "thread"])
def test_stages_in_every_progress_mode(mode):
    """The data path under busy-polling and under a UCX progress thread (blocking is the default on CI)."""
    assert set(_mesh(_stages, env={"STEPMESH_PROGRESS": mode}).values()) == {4}


# ------------------------------------------------- a signature changed in place
def _changed_in_place(ctx: NodeContext) -> int:
    """The same tensor objects, altered in place between calls: each call is sent as it is now."""
    f.init()
    calls = 0
    if ctx.role == "worker":
        push = torch.arange(64, dtype=torch.float32)
        out = torch.zeros(64)
        for _ in range(2):  # once to plan, once to match the plan
            f.wait(f.push_pull([push], [1], [out], [9]))
        assert torch.equal(out, push + 1)
        push.resize_(4, 8)  # same memory, another shape (and fewer bytes)
        f.wait(f.push_pull([push], [1], [out], [9]))
        assert torch.equal(out[:32], push.reshape(-1) + 1)
        f.wait(f.push_pull([push.view(torch.int32)], [1], [out], [9]))  # same memory, another dtype
        f.wait(f.push_pull([push], [2], [out], [9]))  # another key
        f.wait(f.push_pull([push], [1], [out], [9], need_event=False))  # another need_event
        out.resize_(8)  # a smaller pull buffer: the answer must not fit
        h = f.push_pull([push], [1], [out], [9])
        with pytest.raises(f.PeerError, match="holds only"):
            f.wait(h)
        calls = 7
    else:
        seen = []
        for _ in range(7):
            (h, (t,), keys), = f.get_batch()
            seen.append((tuple(t.shape), t.dtype, keys))
            if t.dtype is torch.int32:
                f.respond([t], h)
            elif keys == [1] and seen[-1][0] == (4, 8) and len(seen) == 7:
                with pytest.raises(f.ArgumentError, match="holds only"):
                    f.respond([t.reshape(-1) + 1], h)
            else:
                f.respond([t.reshape(-1) + 1], h)
        assert seen == [
            ((64,), torch.float32, [1]), ((64,), torch.float32, [1]), ((4, 8), torch.float32, [1]),
            ((4, 8), torch.int32, [1]), ((4, 8), torch.float32, [2]), ((4, 8), torch.float32, [1]),
            ((4, 8), torch.float32, [1]),
        ], seen
        calls = len(seen)
    f.stop()
    return calls


@pytest.mark.timeout(120)
def test_tensors_changed_in_place_are_sent_as_they_are_now():
    assert _mesh(_changed_in_place) == {"server-0-0": 7, "worker-0-0": 7}


# ------------------------------------------------------------- waiting longer
def _answers_late(ctx: NodeContext) -> str:
    import numpy as np

    f.init()
    if ctx.role == "worker":
        out = [torch.zeros(8)]
        h = f.push_pull([torch.ones(8)], [0], out, [0])
        t0 = time.monotonic()
        with pytest.raises(f.TimeoutError, match="no response yet from: server rank 0"):
            f.wait(h, timeout_ms=300)
        assert 0.25 < time.monotonic() - t0 < 5
        with pytest.raises(f.ArgumentError, match="timeout_ms"):
            f.wait(h, timeout_ms="soon")
        f.wait(np.int64(h), timeout_ms=np.float32(20000))  # numbers of other types do
        assert torch.all(out[0] == 2)
        with pytest.raises(f.ArgumentError, match="unknown"):
            f.wait(h)
    else:
        (h, (t,), _), = f.get_batch()
        time.sleep(1.0)
        f.respond([t * 2], h)
    f.stop()
    return "ok"


@pytest.mark.timeout(120)
def test_a_wait_that_times_out_names_the_server_and_the_call_stays_valid():
    assert set(_mesh(_answers_late).values()) == {"ok"}


# ------------------------------------------------- fresh tensors every call
def _fresh_every_call(ctx: NodeContext) -> int:
    """Tensors allocated anew for every call (as `x = layer(x)` does): nothing may hold on to them after."""
    import gc
    import weakref

    f.init()
    alive = 0
    made = []
    if ctx.role == "worker":
        for i in range(50):
            push, out = torch.full((SMALL,), float(i)), torch.empty(LARGE)
            made += [weakref.ref(push), weakref.ref(out)]
            f.wait(f.push_pull([push, torch.full((LARGE,), float(i))], [0, 1], [out], [0]))
            assert out[0] == i + 1 and out[-1] == i + 1
        del push, out
    else:
        for _ in range(50):
            (h, (small, t), _), = f.get_batch()
            answer = t + 1
            made += [weakref.ref(small), weakref.ref(t), weakref.ref(answer)]
            f.respond([answer], h)
        del small, t, answer
        f.flush()
        f.get_batch(timeout_ms=50)  # the core lets a request's tensors go once its answer has left
    gc.collect()
    alive = sum(r() is not None for r in made)
    f.stop()
    return alive


@pytest.mark.timeout(120)
def test_tensors_made_for_one_call_are_not_held_after_it():
    """(Plans once held their pull tensors: every fresh one stayed alive, up to 256 of them.)"""
    assert _mesh(_fresh_every_call) == {"server-0-0": 0, "worker-0-0": 0}


# ------------------------------------------------------------ dynamic sizes
def _short_and_long(ctx: NodeContext) -> str:
    dev = _dev(ctx)
    f.init()
    if ctx.role == "worker":
        for n in (SMALL, LARGE):
            out = torch.full((n,), -7.0, device=dev)
            f.wait(f.push_pull([torch.ones(4, device=dev)], [1], [out], [2]))
            half = n // 2
            assert torch.all(out[:half] == 3.0) and torch.all(out[half:] == -7.0), "short answer"
            h = f.push_pull([torch.ones(4, device=dev)], [1], [out], [2])
            with pytest.raises(f.PeerError, match="holds only"):
                f.wait(h)
            assert torch.all(out[:half] == 3.0) and torch.all(out[half:] == -7.0), "a refusal wrote into the pull tensor"
            h = f.push_pull([torch.ones(4, device=dev)], [1], [out], [2])
            t0 = time.monotonic()
            with pytest.raises(f.PeerError, match="asked this server for 1"):
                f.wait(h)  # the wrong number of answers: told at once, not after the timeout
            assert time.monotonic() - t0 < 2.0
            f.wait(f.push_pull([torch.ones(4, device=dev)], [1], [out], [2]))  # the mesh still works
            assert torch.all(out[:half] == 3.0)
    else:
        for n in (SMALL, LARGE):
            (h, _, _), = f.get_batch()
            f.respond([torch.full((n // 2,), 3.0, device=dev)], h)
            (h, _, _), = f.get_batch()
            with pytest.raises(f.ArgumentError, match=r"tensors\[0\] has"):
                f.respond([torch.zeros(n + 1, device=dev)], h)
            (h, _, _), = f.get_batch()
            with pytest.raises(f.ArgumentError, match="asked this server for 1"):
                f.respond([torch.zeros(2, device=dev), torch.zeros(2, device=dev)], h)
            (h, _, _), = f.get_batch()
            f.respond([torch.full((n // 2,), 3.0, device=dev)], h)
    f.stop()
    return "ok"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device", DEVICES)
def test_short_answers_write_a_prefix_and_refusals_reach_the_worker_at_once(device):
    assert set(_mesh(_short_and_long, device).values()) == {"ok"}


# ------------------------------------------------------------------- dtypes
DTYPES = [
    torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn,
    torch.float8_e5m2, torch.int32, torch.int64, torch.uint8,
]


def _random_bytes(dtype: torch.dtype, n: int, seed: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n * torch.empty(0, dtype=dtype).element_size(),), dtype=torch.uint8, generator=g)
    return (raw.view(dtype).reshape(-1, 2) if n % 2 == 0 else raw.view(dtype)).to(device)


def _dtypes(ctx: NodeContext) -> int:
    dev = _dev(ctx)
    f.init()
    count = 0
    for n in (SMALL, LARGE):
        if ctx.role == "worker":
            push = [_random_bytes(dt, n, i, dev) for i, dt in enumerate(DTYPES)]
            pull = [torch.empty_like(t) for t in push]
            f.wait(f.push_pull(push, list(range(len(push))), pull, list(range(len(push)))))
            for t, p in zip(push, pull):
                assert p.dtype == t.dtype and p.shape == t.shape
                assert torch.equal(p.view(torch.uint8), t.view(torch.uint8)), t.dtype
                count += 1
        else:
            (h, tensors, keys), = f.get_batch()
            for t, dt in zip(tensors, DTYPES):
                assert t.dtype == dt and t.shape == (n // 2, 2)
            f.respond(tensors, h)
            count += len(tensors)
    f.stop()
    return count


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device", DEVICES)
def test_every_dtype_survives_bit_exact(device):
    assert set(_mesh(_dtypes, device).values()) == {2 * len(DTYPES)}


# ------------------------------------------------------- registered buffers
def _registered(ctx: NodeContext) -> list[bool]:
    """StepMesh's pairing: chunk i of the buffer takes key push_keys[i] from worker worker_ranks[i]."""
    dev = _dev(ctx)
    f.init()
    inside = []
    keys = [5, 6]
    if ctx.role == "server":
        n_workers = f.node_info().num_workers
        pool = torch.zeros(n_workers * len(keys) * LARGE * 4, dtype=torch.uint8, device=dev)
        ranks = [w for w in range(n_workers) for _ in keys]
        f.register_recv_buffer(pool, ranks, keys * n_workers)
        lo, hi = pool.data_ptr(), pool.data_ptr() + pool.numel()
    f.barrier()
    for n in (SMALL, LARGE):
        if ctx.role == "worker":
            push = [torch.full((n,), float(ctx.rank + 1), device=dev), torch.full((n,), 2.0, device=dev)]
            out = [torch.zeros(n, device=dev)]
            f.wait(f.push_pull(push, keys, out, [0]))
            assert torch.all(out[0] == 3.0 + ctx.rank)
        else:
            for w, (h, tensors, ks) in enumerate(f.get_batch()):
                for t, k in zip(tensors, ks):
                    chunk = (w * len(keys) + keys.index(k)) * LARGE * 4
                    inside.append(t.data_ptr() == lo + chunk and t.data_ptr() + t.numel() * 4 <= hi)
                assert torch.all(tensors[0] == w + 1)
                f.respond([tensors[0] + tensors[1]], h)
    mapped = f._server("respond")._core.mapped if ctx.role == "server" else 0
    f.stop()
    return inside, mapped


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hints, progress, maps", [("host", "polling", 0), ("all", "polling", 4), ("all", "thread", 0)])
def test_registered_buffers_receive_pushes_in_place(device, hints, progress, maps):
    """With STEPMESH_MEMORY_HINTS=all the large pushes arrive through chunks mapped with ucp_mem_map (one per
    chunk a layout receives into separately: 2 workers x 2 keys, and on a GPU the small ones too), and still in place; never mapped in thread
    progress mode (ucp_mem_map would race the progress thread on the unlocked context)."""
    env = {"STEPMESH_MEMORY_HINTS": hints, "STEPMESH_PROGRESS": progress}
    inside, mapped = _mesh(_registered, device, num_workers=2, num_servers=1, env=env)["server-0-0"]
    assert inside == [True] * 8
    assert mapped == maps * (2 if device == "cuda" else 1)  # on a GPU the small pushes take the lane: separate too


def _worker_maps(ctx: NodeContext) -> tuple[int, int, int, bool] | int:
    """A hidden state and its count each way, the pull tensors freed and allocated again between calls (torch's
    cache off: each goes back to the driver, and the next one tends to get the same address in a new allocation).
    The server answers from fresh tensors, each a new allocation: from the second on lent (synchronised,
    need_event=False), so mapped until the cap of 4 mappings per answer."""
    dev = _dev(ctx)
    f.init()
    f.barrier()
    result = None
    if ctx.role == "worker":
        hidden = torch.randn(LARGE, device=dev)
        count = torch.tensor([7], dtype=torch.int32, device=dev)
        reused, seen = False, set()
        for rnd in range(6):
            out = torch.zeros(LARGE, device=dev)
            out_count = torch.zeros(1, dtype=torch.int32, device=dev)
            where = (out.data_ptr(), out_count.data_ptr())  # the plan is found again only if both recur
            reused = reused or where in seen
            seen.add(where)
            count.fill_(rnd)
            f.wait(f.push_pull([hidden, count], [1, 2], [out, out_count], [3, 4]))
            assert torch.equal(out, hidden * 2), rnd
            assert int(out_count) == rnd + 1, (rnd, int(out_count))
            del out, out_count
        core = f._worker("push_pull")._core
        result = (core.mapped, core.remade, core.in_flight, reused)
    else:
        for rnd in range(6):
            (h, (t, c), _), = f.get_batch()
            answers = [t * 2, c + 1]
            if rnd >= 1 and dev == "cuda":
                torch.cuda.current_stream().synchronize()
            f.respond(answers, h, need_event=rnd < 1)
            del answers
        result = f._server("respond")._core.lent_mapped
    f.stop()
    return result


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hints, progress, one_sided", [("host", "polling", "device"), ("all", "polling", "off"),
                                                        ("all", "polling", "device"), ("all", "thread", "device")])
def test_worker_maps_device_buffers_only_while_their_allocation_holds(device, hints, progress, one_sided):
    """At STEPMESH_MEMORY_HINTS=all (polling) a worker maps its device pushes and answers with ucp_mem_map and
    checks at every call that the allocation behind each address is the one it mapped: memory freed and allocated
    again at the same address makes the plan anew, and every answer still lands right (written answers too: the
    new plan carries a new key). A server maps the device memory it lends answers from, a bounded number of
    times per answer of a request layout. Host tensors, lower hint levels and thread progress mode map nothing."""
    env = {"STEPMESH_MEMORY_HINTS": hints, "STEPMESH_PROGRESS": progress, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1",
           "STEPMESH_DEVICE_LANE": "1",  # (off) the count answer on the lane: a message of its own, lent and mapped
           "STEPMESH_ONE_SIDED": one_sided}
    results = _mesh(_worker_maps, device, env=env)
    mapped, remade, in_flight, reused = results["worker-0-0"]
    lent_mapped = results["server-0-0"]
    assert in_flight == 0
    if device == "cuda" and hints == "all" and progress == "polling":
        assert reused, "the driver never gave a freed address back: the stale-allocation check went untried"
        assert mapped > 0 and remade > 0, (mapped, remade)
        if one_sided == "off":  # one request layout: 5 lent rounds, a new allocation each, ANSWER_MAPS per answer
            assert lent_mapped == 2 * 4, lent_mapped
        else:  # a new key is a new layout, which maps anew: at most once per answer of each of the 6 rounds (the
            # first too, when the server's stream is idle by then)
            assert 2 <= lent_mapped <= 2 * 6, lent_mapped
    else:
        assert (mapped, remade, lent_mapped) == (0, 0, 0)


def _misaligned(ctx: NodeContext) -> bool:
    """Chunks whose offsets do not suit the dtype: the push still arrives, in fresh memory."""
    f.init()
    if ctx.role == "server":
        pool = torch.zeros(2 * (LARGE * 4 + 2), dtype=torch.uint8)  # chunk 1 starts 2 bytes off
        f.register_recv_buffer(pool, [0, 0], [5, 6])
    f.barrier()
    if ctx.role == "worker":
        out = [torch.zeros(LARGE)]
        f.wait(f.push_pull([torch.full((LARGE,), 1.5), torch.full((LARGE,), 2.0)], [5, 6], out, [0]))
        assert torch.all(out[0] == 3.5)
    else:
        (h, (a, b), _), = f.get_batch()
        f.respond([a + b], h)
    f.stop()
    return True


@pytest.mark.timeout(120)
def test_registered_chunks_that_do_not_suit_the_dtype_fall_back_to_allocation():
    assert all(_mesh(_misaligned).values())


# -------------------------------------------------------------- respond_vec
def _vec(ctx: NodeContext) -> bool:
    f.init()
    rows = [3, 5]
    if ctx.role == "worker":
        out = torch.zeros(8, 4)
        h = f.push_pull([torch.zeros(rows[ctx.rank], 4)], [0], [out], [1])
        t0 = time.monotonic()
        with pytest.raises(f.PeerError, match=["as long as", "duplicates"][ctx.rank]):
            f.wait(h)  # a respond_vec that named this request was refused: told at once, with the reason
        assert time.monotonic() - t0 < 2.0
        h = f.push_pull([torch.zeros(rows[ctx.rank], 4)], [0], [out], [1])
        if ctx.args.get("refused"):
            t0 = time.monotonic()
            with pytest.raises(f.PeerError, match="holds only"):
                f.wait(h)  # told at once, both workers: one answer did not fit
            assert time.monotonic() - t0 < 2.0
            h = f.push_pull([torch.zeros(rows[ctx.rank], 4)], [0], [out], [1])
        f.wait(h)
        n = rows[ctx.rank]
        expect = torch.arange(sum(rows[: ctx.rank]), sum(rows[: ctx.rank]) + n, dtype=torch.float32)
        assert torch.equal(out[:n, 0], expect), out
        assert torch.all(out[n:] == 0)
    else:
        ret = torch.arange(8, dtype=torch.float32).repeat_interleave(4).reshape(8, 4)
        batch = f.get_batch()
        with pytest.raises(f.ArgumentError, match="handles"):
            f.respond_vec(ret, [t[0] for _, t, _ in batch], [batch[0][0]])
        with pytest.raises(f.ArgumentError, match="duplicates"):
            f.respond_vec(ret, [t[0] for _, t, _ in batch], [np.int64(batch[1][0])] * 2)  # numpy handles are handles
        batch = f.get_batch()
        if ctx.args.get("refused"):
            with pytest.raises(f.ArgumentError, match="holds only"):  # 9 rows for worker 1's 8
                f.respond_vec(torch.zeros(12, 4), [torch.zeros(3, 4), torch.zeros(9, 4)], [h for h, _, _ in batch])
            batch = f.get_batch()
        f.respond_vec(ret, [t[0] for _, t, _ in batch], [h for h, _, _ in batch])
        ret.fill_(-1)  # reused at once
    f.stop()
    return True


@pytest.mark.timeout(120)
@pytest.mark.parametrize("refused", [False, True], ids=["answered", "refused-then-answered"])
def test_respond_vec_gives_each_worker_its_own_rows(refused):
    assert all(_mesh(_vec, num_workers=2, num_servers=1, args={"refused": refused}).values())


# ------------------------------------------------------------- full topology
def _full(ctx: NodeContext) -> int:
    f.init()
    info = f.node_info()
    if ctx.role == "worker":
        assert info.num_servers == 2
        pulls = [torch.zeros(4), torch.zeros(4)]
        f.wait(f.push_pull([torch.full((4,), float(ctx.group))], [0], pulls, [0, 0]))
        assert [int(p[0]) for p in pulls] == [ctx.group + 10, ctx.group + 20]
        result = info.num_servers
    else:
        batch = f.get_batch()
        assert [int(t[0][0]) for _, t, _ in batch] == [0, 1]
        for h, (t,), _ in batch:
            f.respond([t + 10 * (ctx.group + 1)], h)
        result = len(batch)
    f.stop()
    return result


@pytest.mark.timeout(120)
def test_full_topology_any_worker_reaches_any_server():
    assert set(_mesh(_full, group_size=2, env={"STEPMESH_TOPOLOGY": "full"}).values()) == {2}


# ---------------------------------------- large and small tensors together
def _mixed(ctx: NodeContext) -> bool:
    """StepMesh's shape: a large hidden state plus a small count tensor each way."""
    dev = _dev(ctx)
    f.init()
    if ctx.role == "worker":
        for rows in (64, 17):  # the answer may be shorter than the pull tensor
            hidden = torch.randn(64, 7168, device=dev).to(torch.bfloat16)
            count = torch.tensor([rows], dtype=torch.int32, device=dev)
            out = torch.zeros(64, 7168, dtype=torch.bfloat16, device=dev)
            out_count = torch.zeros(1, dtype=torch.int32, device=dev)
            f.wait(f.push_pull([hidden[:rows], count], [1, 2], [out, out_count], [3, 4]))
            assert int(out_count) == rows * 2
            assert torch.equal(out[:rows], hidden[:rows] * 2) and torch.all(out[rows:] == 0)
    else:
        for _ in range(2):
            (h, (hidden, count), keys), = f.get_batch()
            assert keys == [1, 2] and hidden.shape == (int(count), 7168)
            f.respond([hidden * 2, count * 2], h)
    f.stop()
    return True


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device", DEVICES)
def test_large_and_small_tensors_in_one_call(device):
    assert all(_mesh(_mixed, device).values())


def _host_count_answer(ctx: NodeContext) -> bool:
    """A device hidden state answered with a host count: both land, the count as it was at respond."""
    dev = _dev(ctx)
    f.init()
    if ctx.role == "worker":
        for rows in (64, 17, 64):
            hidden = torch.randn(64, 7168, device=dev).to(torch.bfloat16)
            count = torch.tensor([rows], dtype=torch.int32, device=dev)
            out = torch.zeros(64, 7168, dtype=torch.bfloat16, device=dev)
            out_count = torch.zeros(1, dtype=torch.int32, device=dev)
            f.wait(f.push_pull([hidden[:rows], count], [1, 2], [out, out_count], [3, 4]))
            assert int(out_count) == rows * 2, (int(out_count), rows)
            assert torch.equal(out[:rows], hidden[:rows] + 1)
    else:
        host_count = torch.zeros(1, dtype=torch.int32, pin_memory=dev == "cuda")
        for _ in range(3):
            (h, (hidden, count), _), = f.get_batch()
            _busy(dev)
            answer = hidden + 1
            host_count.fill_(int(count) * 2)
            f.respond([answer, host_count], h)  # need_event: the device answer is copied on the stream
            host_count.fill_(-1)  # the host answer is the caller's again
    f.stop()
    return True


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lane", ["0", "1"], ids=["packed", "lane"])
@pytest.mark.parametrize("hints", ["off", "all"])
def test_a_host_answer_to_a_device_pull_is_copied_at_respond(device, lane, hints):
    """Without a lane the host count is copied into the device answers' pack; on the lane into a host staging
    buffer: either way it is the caller's again when respond returns. Host and device buffers side by side,
    with every memory type left to UCX and with every one told (STEPMESH_MEMORY_HINTS; the default is host)."""
    env = {"STEPMESH_DEVICE_LANE": lane, "STEPMESH_MEMORY_HINTS": hints}
    assert all(_mesh(_host_count_answer, device, env=env).values())


def _lent_answers(ctx: NodeContext) -> int:
    """Answers whose stream has finished are sent from the caller's memory: overwritten the moment respond
    returns, they must still arrive as they were."""
    dev = _dev(ctx)
    need_event = ctx.args["need_event"]
    f.init()
    checked = 0
    if ctx.role == "worker":
        push = [torch.full((LARGE,), float(i), device=dev) for i in range(3)]
        outs = [torch.zeros(LARGE, device=dev) for _ in range(3)]
        counts = [torch.zeros(1, dtype=torch.int32, device=dev) for _ in range(3)]
        for rnd in range(10):
            for i in range(3):
                push[i].fill_(float(rnd * 3 + i))
            handles = [f.push_pull([push[i]], [i], [outs[i], counts[i]], [10 + i, 20 + i]) for i in range(3)]
            for i, h in enumerate(handles):
                f.wait(h)
                assert torch.equal(outs[i], torch.full_like(outs[i], float(rnd * 3 + i) * 2)), (rnd, i)
                assert int(counts[i]) == rnd * 3 + i, (rnd, i, int(counts[i]))
                checked += 1
    else:
        answer = torch.empty(LARGE, device=dev)
        count = torch.empty(1, dtype=torch.int32, device=dev)
        served = 0
        while served < 30:
            for h, (t,), _ in f.get_batch():
                torch.mul(t, 2, out=answer)
                count.fill_(served)
                if dev == "cuda":
                    while not torch.cuda.current_stream().query():  # the work is done: nothing left to wait for
                        pass
                f.respond([answer, count], h, need_event=need_event)
                answer.fill_(-1.0)  # the caller's again at once
                count.fill_(-1)
                served += 1
    f.stop()
    return checked


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need_event", [True, False], ids=["need_event", "no_event"])
def test_answers_sent_from_the_callers_memory_have_left_when_respond_returns(device, need_event):
    """A device answer whose stream is idle (or with need_event=False), like a large host one, is lent to UCX
    instead of staged: respond must not return before the worker has it."""
    results = _mesh(_lent_answers, device, args={"need_event": need_event})
    assert results == {"worker-0-0": 30, "server-0-0": 0}


# ------------------------------------------- many request layouts, recycled
def _many_layouts(ctx: NodeContext) -> int:
    """More distinct layouts (keys, shapes, header sizes) than fit a table slot, twice over."""
    f.init()
    shapes = [(n,) if i % 2 else (n // 4, 4) for i, n in enumerate(range(8, 8 + 4 * 300, 4))]  # 300 layouts
    checked = 0
    for _ in range(2):
        for i, shape in enumerate(shapes):
            if ctx.role == "worker":
                push = torch.full(shape, float(i))
                out = torch.zeros(shape)
                f.wait(f.push_pull([push], [i], [out], [1000 + i]))
                assert torch.equal(out, push + 1), (i, shape)
            else:
                (h, (t,), keys), = f.get_batch()
                assert keys == [i] and tuple(t.shape) == shape, (i, keys, t.shape)
                f.respond([t + 1], h)
            checked += 1
    f.stop()
    return checked


@pytest.mark.timeout(120)
def test_more_request_layouts_than_the_tables_hold():
    assert set(_mesh(_many_layouts).values()) == {600}


# ------------------------------------------------- answer in flight at stop
def _answer_then_stop(ctx: NodeContext) -> bool:
    """A server that stops right after a large respond() still delivers it."""
    dev = _dev(ctx)
    f.init()
    if ctx.role == "worker":
        out = [torch.zeros(LARGE, device=dev)]
        f.wait(f.push_pull([torch.ones(LARGE, device=dev)], [0], out, [0]), timeout_ms=20000)
        assert torch.all(out[0] == 2.0)
    else:
        (h, (t,), _), = f.get_batch()
        _busy(dev, 100_000_000)
        f.respond([t * 2], h)  # its event completes while the server is in stop()
    f.stop()
    return True


@pytest.mark.timeout(300)
@pytest.mark.parametrize("device", DEVICES)
def test_answer_in_flight_when_the_server_stops_is_delivered(device):
    assert all(_mesh(_answer_then_stop, device).values())


# ------------------------------------------------------------------ bad input
def _bad_input(ctx: NodeContext) -> int:
    f.init()
    raised = 0
    if ctx.role == "worker":
        ok = [torch.ones(4)]
        out = [torch.zeros(4)]
        bad_calls = [
            ("push_tensors", lambda: f.push_pull([torch.ones(4, 4).t()], [0], out, [0])),
            ("push_tensors", lambda: f.push_pull(torch.ones(4), [0], out, [0])),
            ("push_keys", lambda: f.push_pull(ok, [0, 1], out, [0])),
            ("push_keys", lambda: f.push_pull(ok, ["a"], out, [0])),
            ("push_keys", lambda: f.push_pull(ok, [2**63], out, [0])),
            ("pull_keys", lambda: f.push_pull(ok, [0], out, [])),
            ("pull_tensors", lambda: f.push_pull(ok, [0], [torch.zeros(4)] * 300, list(range(300)))),
            ("push_tensors", lambda: f.push_pull([torch.zeros(1)] * 65, list(range(65)), out, [0])),
            ("pull_tensors", lambda: f.push_pull(ok, [0], [torch.zeros(4, 2).t()] * 2, [0, 1])),
            ("need_event", lambda: f.push_pull(ok, [0], out, [0], need_event="yes")),
            ("handle", lambda: f.wait(12345)),
            ("handle", lambda: f.wait("h")),
            ("handle", lambda: f.get_all_handlers(-1)),
            ("handle", lambda: f.fetch_trace(12345)),
        ]
        for name, call in bad_calls:
            with pytest.raises(f.ArgumentError, match=name):
                call()
            raised += 1
        with pytest.raises(f.StepMeshError, match="server call"):
            f.get_batch()
        # a conjugated view of a planned tensor has its address, shape and dtype: refused all the same
        z, z_out = torch.full((4,), 1 + 2j, dtype=torch.complex64), torch.zeros(4, dtype=torch.complex64)
        f.wait(f.push_pull([z], [0], [z_out], [0]))
        assert torch.equal(z_out, z)
        for name, call in (("push_tensors", lambda: f.push_pull([z.conj()], [0], [z_out], [0])),
                           ("pull_tensors", lambda: f.push_pull([z], [0], [z_out.conj()], [0]))):
            with pytest.raises(f.ArgumentError, match=name + r"\[0\] is a lazily conjugated"):
                call()
            raised += 1
        # nothing was sent: the server sees exactly these requests
        held = [f.push_pull(ok, [0], [torch.zeros(4)], [0]) for _ in range(W.MAX_IN_FLIGHT)]
        with pytest.raises(f.ArgumentError, match="in flight"):
            f.push_pull(ok, [0], out, [0])
        for h in held:
            f.wait(h)
        with pytest.raises(f.ArgumentError, match="pull_tensors.*dimensions"):
            f.push_pull(ok, [0], [torch.zeros([1] * 9)], [0])
        h = f.push_pull(ok, [0], out, [0])
        with pytest.raises(f.PeerError, match="conjugated"):
            f.wait(h, timeout_ms=5000)  # the server refused a conjugated view as its answer
        h = f.push_pull(ok, [0], out, [0])
        with pytest.raises(f.PeerError, match="dimensions"):
            f.wait(h, timeout_ms=5000)  # the server refused its nine-dimensional answer
        h = f.push_pull(ok, [0], out, [0])
        with pytest.raises(f.ArgumentError, match="handle once"):
            f.wait(h, handler=h)
        f.wait(handler=h)  # StepMesh's keyword
        with pytest.raises(f.ArgumentError, match="handle"):
            f.wait(h)  # already waited for
        assert torch.all(out[0] == 1.0)
    else:
        with pytest.raises(f.StepMeshError, match="worker call"):
            f.push_pull([], [], [], [])
        with pytest.raises(f.ArgumentError, match="worker_ranks"):
            f.register_recv_buffer(torch.zeros(16), [5], [0])
        with pytest.raises(f.ArgumentError, match="as long as worker_ranks"):
            f.register_recv_buffer(torch.zeros(16), [0], [0, 1])
        with pytest.raises(f.ArgumentError, match="split evenly"):
            f.register_recv_buffer(torch.zeros(3, dtype=torch.uint8), [0, 0], [0, 1])
        for _ in range(1 + W.MAX_IN_FLIGHT):
            (h, tensors, keys), = f.get_batch(timeout_ms=20000)
            f.respond(tensors, h)
        (h, tensors, keys), = f.get_batch(timeout_ms=20000)
        with pytest.raises(f.ArgumentError, match="conjugated"):  # refused: the worker learns why at once
            f.respond([torch.zeros(2).to(torch.complex64).conj()], h)
        (h, tensors, keys), = f.get_batch(timeout_ms=20000)
        with pytest.raises(f.ArgumentError, match="handle"):
            f.respond(tensors, h + 99)
        with pytest.raises(f.ArgumentError, match="need_event"):
            f.respond(tensors, h, need_event="yes")
        with pytest.raises(f.ArgumentError, match="dimensions"):  # refused: the worker learns why at once
            f.respond([torch.zeros([1] * 9)], h)
        (h, tensors, keys), = f.get_batch(timeout_ms=20000)
        f.respond(tensors, handler=h)  # StepMesh's keyword
        assert f.get_batch(timeout_ms=300) == []  # no stray request arrived
        raised = 7
    f.stop()
    return raised


@pytest.mark.timeout(120)
def test_bad_input_raises_before_anything_is_sent():
    results = _mesh(_bad_input)
    assert results == {"server-0-0": 7, "worker-0-0": 16}


def test_calls_before_init_are_clear_errors():
    with pytest.raises(f.StepMeshError, match="before stepmesh.init"):
        f.push_pull([], [], [], [])
    with pytest.raises(f.StepMeshError, match="before stepmesh.init"):
        f.get_batch()
    with pytest.raises(f.StepMeshError, match="before stepmesh.init"):
        f.node_info()


# ------------------------------------------------- a server loop that ends
def _until_workers_stop(ctx: NodeContext) -> int:
    """Workers make a number of calls the server does not know; the server loops until they all stopped."""
    f.init()
    calls = 0
    if ctx.role == "worker":
        for i in range(5):
            out = [torch.zeros(4)]
            f.wait(f.push_pull([torch.full((4,), float(i))], [0], out, [0]))
            assert torch.all(out[0] == i + 1)
            calls += 1
        time.sleep(0.5 * ctx.rank)  # they stop at different times
    else:
        with pytest.raises(f.StepMeshError, match="worker call"):
            f.push_pull([], [], [], [])
        assert not f.workers_stopped()
        while True:
            batch = f.get_batch()  # no timeout: it returns [] once every worker has stopped
            if not batch and f.workers_stopped():
                break
            for h, (t,), _ in batch:
                f.respond([t + 1], h)
            calls += 1
    f.stop()
    return calls


@pytest.mark.timeout(60)
def test_a_server_loop_ends_when_every_worker_has_stopped():
    """(get_batch() once blocked while the workers sat in stop(): servers had to count requests.)"""
    results = _mesh(_until_workers_stop, num_workers=2, num_servers=1, timeout=40)
    assert results["server-0-0"] == 5 and results["worker-0-0"] == 5


# ------------------------------------------------------ lent host answers
def _lent(ctx: NodeContext) -> str:
    f.init()
    if ctx.role == "worker":
        out = [torch.zeros(LARGE)]
        h = f.push_pull([torch.ones(LARGE)], [0], out, [0])
        time.sleep(1.0)  # busy elsewhere, outside stepmesh
        f.wait(h)
        assert torch.all(out[0] == 2)
        f.stop()
        return "ok"
    (h, (t,), _), = f.get_batch()
    answer = t * 2
    f.respond([answer], h)
    lent = f._server("respond")._core.lent
    answer.fill_(-1)  # the caller's again at once
    f.stop()
    return f"lent {lent}"


@pytest.mark.timeout(120)
def test_a_large_host_answer_has_left_when_respond_returns():
    """A large host answer is sent from the caller's memory, without a copy: respond returns once UCX is done with it."""
    assert _mesh(_lent) == {"worker-0-0": "ok", "server-0-0": "lent 0"}
