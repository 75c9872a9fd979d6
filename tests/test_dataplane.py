"""push_pull / get_batch / respond between real processes over UCX."""

from __future__ import annotations

import os
import time

import pytest
import torch

import stepmesh as f
from stepmesh.testing import NodeContext, run_mesh

from .conftest import FAST

SMALL = 64  # elements: travels inline with the header
LARGE = 300_000  # elements: travels by rendezvous into the destination


# Every test here runs on both implementations of the steady state: the C cores
# (stepmesh._ucpc) and the Python bookkeeping over ctypes (STEPMESH_NATIVE=0,
# what runs where no compiler was there at install).
_NATIVE = {"c": "1", "python": "0"}
_impl = ["c"]


@pytest.fixture(params=sorted(_NATIVE), autouse=True)
def impl(request):
    _impl[0] = request.param
    yield request.param
    _impl[0] = "c"


def _mesh(target, **kw):
    env = dict(kw.pop("env", FAST))
    env.setdefault("STEPMESH_NATIVE", _NATIVE[_impl[0]])
    kw.setdefault("timeout", 90)
    results = run_mesh(target, env=env, **kw)
    assert results.pop("scheduler") is None
    return results


# ------------------------------------------------------------- the seed's test
def _seed_sum(ctx: NodeContext) -> int:
    """StepMesh's first test: push 3 tensors, pull 1, the server answers their sum."""
    f.init()
    checked = 0
    if ctx.role == "worker":
        for n in (SMALL, LARGE):
            push = [torch.rand(n) for _ in range(3)]
            pull = [torch.zeros(n)]
            h = f.push_pull(push, [0, 1, 2], pull, [3])
            f.wait(h)
            assert torch.allclose(pull[0], push[0] + push[1] + push[2])
            checked += 1
    else:
        for _ in range(2):
            (handle, tensors, keys), = f.get_batch()
            assert keys == [0, 1, 2]
            f.respond([tensors[0] + tensors[1] + tensors[2]], handle)
            checked += 1
    f.stop()
    return checked


@pytest.mark.timeout(120)
def test_seed_sum():
    assert _mesh(_seed_sum) == {"server-0-0": 2, "worker-0-0": 2}


# ----------------------------------------------------------------- M x N
def _mxn(ctx: NodeContext) -> int:
    f.init()
    node = f._node
    servers = node.config.num_servers
    rounds = 0
    for n in (SMALL, LARGE):
        if ctx.role == "worker":
            mark = torch.full((n,), float(ctx.rank))
            pulls = [torch.zeros(n) for _ in range(servers * 2)]
            keys = [1000 * s + j for s in range(servers) for j in range(2)]
            h = f.push_pull([mark, torch.arange(n, dtype=torch.float32)], [7, 8], pulls, keys)
            f.wait(h)
            for s in range(servers):
                for j in range(2):
                    expect = mark + torch.arange(n) + 100 * s + 10 * j
                    assert torch.equal(pulls[s * 2 + j], expect), (s, j, pulls[s * 2 + j][:3])
            assert len(f.get_all_handlers(h)) == servers + 1
            main, *subs = (f.fetch_trace(x) for x in f.get_all_handlers(h))
            assert all(len(tr) == 8 for tr in subs) and main == max(subs, key=lambda tr: tr[6])
            assert all(tr[0] <= tr[1] <= tr[6] <= tr[7] for tr in subs)
        else:
            batch = f.get_batch()
            assert len(batch) == node.config.num_workers
            for w, (handle, tensors, keys) in enumerate(batch):
                assert keys == [7, 8]
                assert torch.all(tensors[0] == w), "batch not in worker-rank order"
                base = tensors[0] + tensors[1] + 100 * ctx.rank
                f.respond([base, base + 10], handle)
        rounds += 1
    f.stop()
    return rounds


@pytest.mark.timeout(150)
def test_two_workers_three_servers_route_every_answer():
    results = _mesh(_mxn, num_workers=2, num_servers=3, timeout=120)
    assert set(results.values()) == {2} and len(results) == 5


# ------------------------------------------------------- a slow server shows
def _slow_server(ctx: NodeContext) -> str:
    f.init()
    if ctx.role == "worker":
        pulls = [torch.zeros(4) for _ in range(3)]
        h = f.push_pull([torch.ones(4)], [0], pulls, [0, 0, 0])
        f.wait(h)
        main, *subs = (f.fetch_trace(x) for x in f.get_all_handlers(h))
        late = subs[0][6] - max(subs[1][6], subs[2][6])  # server 0 answered 0.3 s after the others
        assert late > 0.15e9, [tr[6] for tr in subs]
        assert main == subs[0]
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
    f.init()
    native = os.environ["STEPMESH_NATIVE"] == "1"
    assert type(f._node.data.ops).__module__ == ("stepmesh._ucpc" if native else "stepmesh._ucp")
    assert (f._node._core is not None) == native, "the implementation asked for"
    n_stages, rounds = 3, 4
    if ctx.role == "worker":
        buf = torch.arange(LARGE, dtype=torch.float32)
        for _ in range(rounds):
            handles, pulls = [], []
            for s in range(n_stages):
                length = [LARGE, 17, LARGE // 3][s]  # dynamic: slices of one buffer
                out = torch.full((length,), -1.0)
                pulls.append((out, buf[:length] * 2 + s))
                handles.append(f.push_pull([buf[:length]], [s], [out], [100 + s]))
            for h, (out, expect) in zip(reversed(handles), reversed(pulls)):
                f.wait(h)
                assert torch.equal(out, expect)
    else:
        for _ in range(rounds):
            batches = [f.get_batch() for _ in range(n_stages)]
            for batch in reversed(batches):  # answer out of order
                (handle, (t,), (key,)), = batch
                assert t.shape[0] == [LARGE, 17, LARGE // 3][key]
                f.respond([t * 2 + key], handle)
    f.stop()
    return rounds


@pytest.mark.timeout(120)
def test_three_stages_in_flight_answered_out_of_order():
    assert set(_mesh(_stages).values()) == {4}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["polling", "thread"])
def test_stages_in_every_progress_mode(mode):
    """The data path under busy-polling and under a UCX progress thread (blocking is the default above)."""
    assert set(_mesh(_stages, env={**FAST, "STEPMESH_PROGRESS": mode}).values()) == {4}


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


# ------------------------------------------------ sends that wait for a stream
class _LateEvent:
    """A stream event that completes only at its fourth look (a CUDA stream still busy)."""

    def __init__(self, *args) -> None:
        self.looks = 0

    def query(self) -> bool:
        self.looks += 1
        return self.looks > 3


def _late_events(ctx: NodeContext) -> int:
    """need_event's path with host tensors: events that complete late hold the sends back, never the caller."""
    from types import SimpleNamespace

    from stepmesh.server import AFTensorServer
    from stepmesh.worker import AFTensorWorker

    released = []
    AFTensorWorker._event_source = staticmethod(lambda push: (_LateEvent, released.append))
    backend = SimpleNamespace(release_event=released.append, wait_event=lambda e: None)
    AFTensorServer._event = staticmethod(lambda ts: (_LateEvent(), backend))
    f.init()
    rounds = 3
    if ctx.role == "worker":
        for r in range(rounds):
            calls = []
            for s, n in enumerate((SMALL, LARGE, 5)):
                push = torch.full((n,), float(r + s))
                out = torch.zeros(n)
                calls.append((f.push_pull([push], [s], [out], [s]), out, push + 1))
            for h, out, expect in calls:
                f.wait(h)
                assert torch.equal(out, expect)
    else:
        for _ in range(rounds):
            for _ in range(3):
                (h, (t,), _), = f.get_batch()
                f.respond([t + 1], h, need_event=True)
    f.stop()
    assert len(released) == 3 * rounds, released  # every event went back to its backend
    return len(released)


@pytest.mark.timeout(120)
def test_sends_wait_for_their_stream_event_without_blocking_the_caller():
    assert _mesh(_late_events) == {"server-0-0": 9, "worker-0-0": 9}


# ------------------------------------------------- fresh tensors every call
def _fresh_every_call(ctx: NodeContext) -> int:
    """Tensors allocated anew for every call (as `x = layer(x)` does): nothing may hold on to them after."""
    import gc
    import weakref

    f.init()
    alive = 0
    if ctx.role == "worker":
        made = []
        for i in range(50):
            push, out = torch.full((SMALL,), float(i)), torch.empty(LARGE)
            made += [weakref.ref(push), weakref.ref(out)]
            f.wait(f.push_pull([push, torch.full((LARGE,), float(i))], [0, 1], [out], [0]))
            assert out[0] == i + 1 and out[-1] == i + 1
        del push, out
        gc.collect()
        alive = sum(r() is not None for r in made)
    else:
        for _ in range(50):
            (h, (_, t), _), = f.get_batch()
            f.respond([t + 1], h)
    f.stop()
    return alive


@pytest.mark.timeout(120)
def test_tensors_made_for_one_call_are_not_held_after_it():
    """(Plans once held their pull tensors: every fresh one stayed alive, up to 256 of them.)"""
    assert _mesh(_fresh_every_call) == {"server-0-0": 0, "worker-0-0": 0}


# ------------------------------------------------------------ dynamic sizes
def _short_and_long(ctx: NodeContext) -> str:
    f.init()
    result = "ok"
    if ctx.role == "worker":
        for n in (SMALL, LARGE):
            out = torch.full((n,), -7.0)
            f.wait(f.push_pull([torch.ones(4)], [1], [out], [2]))
            half = n // 2
            assert torch.all(out[:half] == 3.0) and torch.all(out[half:] == -7.0), "short answer"
            h = f.push_pull([torch.ones(4)], [1], [out], [2])
            with pytest.raises(f.PeerError, match="holds only"):
                f.wait(h)
            assert torch.all(out[:half] == 3.0) and torch.all(out[half:] == -7.0), "a refusal wrote into the pull tensor"
            # the mesh still works afterwards
            f.wait(f.push_pull([torch.ones(4)], [1], [out], [2]))
            assert torch.all(out[:half] == 3.0)
    else:
        for n in (SMALL, LARGE):
            (h, _, _), = f.get_batch()
            f.respond([torch.full((n // 2,), 3.0)], h)
            (h, _, _), = f.get_batch()
            with pytest.raises(f.ArgumentError, match=r"tensors\[0\] has"):
                f.respond([torch.zeros(n + 1)], h)
            (h, _, _), = f.get_batch()
            f.respond([torch.full((n // 2,), 3.0)], h)
    f.stop()
    return result


@pytest.mark.timeout(120)
def test_short_answers_write_a_prefix_and_long_ones_fail_clearly():
    assert set(_mesh(_short_and_long).values()) == {"ok"}


# ------------------------------------------------------------------- dtypes
DTYPES = [
    torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn,
    torch.float8_e5m2, torch.int32, torch.int64, torch.uint8,
]


def _payload(dtype: torch.dtype, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n * torch.empty(0, dtype=dtype).element_size(),), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(-1, 2) if n % 2 == 0 else raw.view(dtype)


def _dtypes(ctx: NodeContext) -> int:
    f.init()
    count = 0
    for n in (SMALL, LARGE):
        if ctx.role == "worker":
            push = [_payload(dt, n, i) for i, dt in enumerate(DTYPES)]
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


@pytest.mark.timeout(120)
def test_every_dtype_survives_bit_exact():
    assert set(_mesh(_dtypes).values()) == {2 * len(DTYPES)}


# ------------------------------------------------------- registered buffers
def _registered(ctx: NodeContext) -> list[bool]:
    f.init()
    inside = []
    keys = [5, 6]
    if ctx.role == "server":
        n_workers = f._node.num_workers
        pool = torch.zeros(n_workers * len(keys) * LARGE * 4, dtype=torch.uint8)
        f.register_recv_buffer(pool, list(range(n_workers)), keys)
        lo, hi = pool.data_ptr(), pool.data_ptr() + pool.numel()
    f.barrier()
    for n in (SMALL, LARGE):
        if ctx.role == "worker":
            push = [torch.full((n,), float(ctx.rank + 1)), torch.full((n,), 2.0)]
            out = [torch.zeros(n)]
            f.wait(f.push_pull(push, keys, out, [0]))
            assert torch.all(out[0] == 3.0 + ctx.rank)
        else:
            for w, (h, tensors, ks) in enumerate(f.get_batch()):
                for t, k in zip(tensors, ks):
                    chunk = (w * len(keys) + keys.index(k)) * LARGE * 4
                    inside.append(t.data_ptr() == lo + chunk and t.data_ptr() + t.numel() * 4 <= hi)
                assert torch.all(tensors[0] == w + 1)
                f.respond([tensors[0] + tensors[1]], h)
    f.stop()
    return inside


@pytest.mark.timeout(120)
def test_registered_buffers_receive_pushes_in_place():
    results = _mesh(_registered, num_workers=2, num_servers=1)
    assert results["server-0-0"] == [True] * 8


def _misaligned(ctx: NodeContext) -> bool:
    """Chunks whose offsets do not suit the dtype: the push still arrives, in fresh memory."""
    f.init()
    if ctx.role == "server":
        pool = torch.zeros(2 * (LARGE * 4 + 2), dtype=torch.uint8)  # chunk 1 starts 2 bytes off
        f.register_recv_buffer(pool, [0], [5, 6])
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
        f.wait(f.push_pull([torch.zeros(rows[ctx.rank], 4)], [0], [out], [1]))
        n = rows[ctx.rank]
        expect = torch.arange(sum(rows[: ctx.rank]), sum(rows[: ctx.rank]) + n, dtype=torch.float32)
        assert torch.equal(out[:n, 0], expect), out
        assert torch.all(out[n:] == 0)
    else:
        batch = f.get_batch()
        ret = torch.arange(8, dtype=torch.float32).repeat_interleave(4).reshape(8, 4)
        with pytest.raises(f.ArgumentError, match="handles"):
            f.respond_vec(ret, [t[0] for _, t, _ in batch], [batch[0][0]])
        with pytest.raises(f.ArgumentError, match="duplicates"):
            f.respond_vec(ret, [t[0] for _, t, _ in batch], [batch[0][0]] * 2)
        f.respond_vec(ret, [t[0] for _, t, _ in batch], [h for h, _, _ in batch])
    f.stop()
    return True


@pytest.mark.timeout(120)
def test_respond_vec_gives_each_worker_its_own_rows():
    assert all(_mesh(_vec, num_workers=2, num_servers=1).values())


# ------------------------------------------------------------- full topology
def _full(ctx: NodeContext) -> int:
    f.init()
    node = f._node
    if ctx.role == "worker":
        assert node.num_servers == 2
        pulls = [torch.zeros(4), torch.zeros(4)]
        f.wait(f.push_pull([torch.full((4,), float(ctx.group))], [0], pulls, [0, 0]))
        assert [int(p[0]) for p in pulls] == [ctx.group + 10, ctx.group + 20]
        result = node.num_servers
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
    env = dict(FAST, STEPMESH_TOPOLOGY="full")
    assert set(_mesh(_full, group_size=2, env=env).values()) == {2}


# ---------------------------------------- large and small tensors together
def _mixed(ctx: NodeContext) -> bool:
    """StepMesh's shape: a large hidden state plus a small count tensor each way."""
    f.init()
    if ctx.role == "worker":
        for rows in (64, 17):  # the answer may be shorter than the pull tensor
            hidden = torch.randn(64, 7168).to(torch.bfloat16)
            count = torch.tensor([rows], dtype=torch.int32)
            out, out_count = torch.zeros(64, 7168, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.int32)
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


@pytest.mark.timeout(120)
def test_large_and_small_tensors_in_one_call():
    assert all(_mesh(_mixed).values())


# ------------------------------------------- many request layouts, recycled
def _many_layouts(ctx: NodeContext) -> int:
    """More distinct layouts (keys, shapes, header sizes) than the server remembers, twice over."""
    f.init()
    shapes = [(n,) if i % 2 else (n // 4, 4) for i, n in enumerate(range(8, 8 + 4 * 40, 4))]  # 40 layouts
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
def test_more_request_layouts_than_the_server_remembers():
    assert set(_mesh(_many_layouts).values()) == {80}


# ------------------------------------------------- answer in flight at stop
def _answer_then_stop(ctx: NodeContext) -> bool:
    """A server that stops right after a large respond() still delivers it."""
    f.init()
    if ctx.role == "worker":
        out = [torch.zeros(LARGE)]
        f.wait(f.push_pull([torch.ones(LARGE)], [0], out, [0]), timeout_ms=20000)
        assert torch.all(out[0] == 2.0)
    else:
        (h, (t,), _), = f.get_batch()
        f.respond([t * 2], h)
    f.stop()
    return True


@pytest.mark.timeout(120)
def test_answer_in_flight_when_the_server_stops_is_delivered():
    assert all(_mesh(_answer_then_stop).values())


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
            ("pull_keys", lambda: f.push_pull(ok, [0], out, [])),
            ("pull_tensors", lambda: f.push_pull(ok, [0], [torch.zeros(4)] * 300, list(range(300)))),
            ("push_tensors", lambda: f.push_pull([torch.zeros(1)] * 65, list(range(65)), out, [0])),
            ("pull_tensors", lambda: f.push_pull(ok, [0], [torch.zeros(4, 2).t()] * 2, [0, 1])),
            ("need_event", lambda: f.push_pull(ok, [0], out, [0], need_event="yes")),
            ("handle", lambda: f.wait(12345)),
            ("handle", lambda: f.get_all_handlers(-1)),
            ("handle", lambda: f.fetch_trace(12345)),
        ]
        for name, call in bad_calls:
            with pytest.raises(f.ArgumentError, match=name):
                call()
            raised += 1
        with pytest.raises(f.StepMeshError, match="server call"):
            f.get_batch()
        pending = f._node._pending  # as if that many were outstanding (keys no handle has)
        pending.update(dict.fromkeys(range(-f.protocol.MAX_IN_FLIGHT, 0)))
        with pytest.raises(f.ArgumentError, match="in flight"):
            f.push_pull(ok, [0], out, [0])
        for k in range(-f.protocol.MAX_IN_FLIGHT, 0):
            del pending[k]
        # nothing was sent: the server sees exactly one request, this one
        h = f.push_pull(ok, [0], out, [0])
        with pytest.raises(f.ArgumentError, match="handle once"):
            f.wait(h, handler=h)
        f.wait(handler=h)  # StepMesh's keyword
        with pytest.raises(f.ArgumentError, match="sub-handle"):
            f.get_all_handlers(f.get_all_handlers(h)[1])
        with pytest.raises(f.ArgumentError, match="handle"):
            f.wait(h)  # already waited for
        assert torch.all(out[0] == 1.0)
    else:
        with pytest.raises(f.StepMeshError, match="worker call"):
            f.push_pull([], [], [], [])
        with pytest.raises(f.ArgumentError, match="worker_ranks"):
            f.register_recv_buffer(torch.zeros(16), [5], [0])
        with pytest.raises(f.ArgumentError, match="split evenly"):
            f.register_recv_buffer(torch.zeros(3, dtype=torch.uint8), [0], [0, 1])
        (h, tensors, keys), = f.get_batch(timeout_ms=20000)
        with pytest.raises(f.ArgumentError, match="tensors"):
            f.respond([tensors[0], tensors[0]], h)
        with pytest.raises(f.ArgumentError, match="handle"):
            f.respond(tensors, h + 99)
        f.respond(tensors, handler=h)  # StepMesh's keyword
        assert f.get_batch(timeout_ms=300) == []  # no stray request arrived
        raised = 5
    f.stop()
    return raised


@pytest.mark.timeout(120)
def test_bad_input_raises_before_anything_is_sent():
    results = _mesh(_bad_input)
    assert results == {"server-0-0": 5, "worker-0-0": 12}


def test_calls_before_init_are_clear_errors():
    with pytest.raises(f.StepMeshError, match="before stepmesh.init"):
        f.push_pull([], [], [], [])
    with pytest.raises(f.StepMeshError, match="before stepmesh.init"):
        f.get_batch()
