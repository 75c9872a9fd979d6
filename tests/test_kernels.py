"""StepMesh's wait kernels: a captured CUDA graph and a CPU thread hand sequence numbers back and forth."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import stepmesh as f
from stepmesh.testing import NodeContext, run_mesh

from .conftest import mesh_env


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the GPU tests below cover it")
def test_without_cuda_each_call_is_a_clear_config_error():
    pinned = torch.zeros(1, dtype=torch.int64)
    for call in (
        lambda: f.map_pinned_tensor(pinned, 0),
        lambda: f.write_flag(pinned, pinned),
        lambda: f.wait_flag(pinned, pinned),
        lambda: f.seq_add_one(pinned),
    ):
        with pytest.raises(f.ConfigError, match="CUDA"):
            call()


def _capture(steps: int, signal: torch.Tensor, ack: torch.Tensor, seq: torch.Tensor) -> torch.cuda.CUDAGraph:
    """The graph of StepMesh's test: bump seq, signal it, let the GPU work, wait for the CPU's ack."""
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        graph.capture_begin()
        for _ in range(steps):
            f.seq_add_one(seq)
            f.write_flag(signal, seq)
            torch.cuda._sleep(1000)
            f.wait_flag(ack, seq)
        graph.capture_end()
    torch.cuda.synchronize()
    return graph


@pytest.mark.gpu
@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; torch sees none here")
def test_graph_and_cpu_thread_hand_sequence_numbers_back_and_forth():
    signal_host = torch.zeros(1, dtype=torch.int64, pin_memory=True)
    ack_host = torch.zeros(1, dtype=torch.int64, pin_memory=True)
    signal, ack = f.map_pinned_tensor(signal_host, 0), f.map_pinned_tensor(ack_host, 0)
    assert signal.is_cuda and signal.data_ptr() != 0
    seq = torch.zeros(1, dtype=torch.int64, device="cuda")
    steps = 24
    ack_host.fill_(steps)  # capturing runs nothing: let the (recorded) waits see a full ack meanwhile
    graph = _capture(steps, signal, ack, seq)
    seen: list[int] = []

    def cpu() -> None:
        expected, deadline = 1, time.monotonic() + 30
        while expected <= steps and time.monotonic() < deadline:
            value = int(signal_host.item())
            if value >= expected:
                seen.append(value)
                ack_host.fill_(value)
                expected += 1

    for replay in range(2):  # seq lives on the device: every replay waits for new values
        seq.zero_()
        ack_host.fill_(0)
        signal_host.fill_(0)
        torch.cuda.synchronize()
        seen.clear()
        thread = threading.Thread(target=cpu)
        thread.start()
        graph.replay()
        torch.cuda.synchronize()
        thread.join(timeout=30)
        assert seen == list(range(1, steps + 1)), (replay, seen)
        assert int(seq) == steps


def _kernel_wait(ctx: NodeContext) -> int:
    """StepMesh's test_kernel_wait, checked: a CPU thread push_pulls each time the graph signals.

    The thread launches no kernel while the graph replays (as StepMesh's does
    not): under CUDA's lazy module loading, the first launch of a kernel loads
    its module, which waits for the spinning graph: a deadlock. It checks each
    answer in a host pull tensor instead.
    """
    f.init()
    steps = 12
    done = 0
    if ctx.role == "worker":
        signal_host = torch.zeros(1, dtype=torch.int64, pin_memory=True)
        ack_host = torch.zeros(1, dtype=torch.int64, pin_memory=True)
        signal, ack = f.map_pinned_tensor(signal_host, 0), f.map_pinned_tensor(ack_host, 0)
        seq = torch.zeros(1, dtype=torch.int64, device="cuda")
        push = [torch.full((8, 8), 3.0, dtype=torch.bfloat16, device="cuda"),
                torch.tensor([8], dtype=torch.int32, device="cuda")]
        pull = [torch.zeros(8, 8, dtype=torch.bfloat16)]
        ack_host.fill_(steps)
        graph = _capture(steps, signal, ack, seq)
        seq.zero_()
        ack_host.fill_(0)
        signal_host.fill_(0)
        torch.cuda.synchronize()
        errors: list[BaseException] = []

        def cpu() -> None:  # a thread of its own: push_pull and wait from it, as StepMesh's test does
            nonlocal done
            try:
                expected = 1
                while expected <= steps:
                    if int(signal_host.item()) < expected:
                        continue
                    f.wait(f.push_pull(push, [1, 2], pull, [3], need_event=False))
                    assert torch.all(pull[0] == float(expected)), (expected, pull[0][0, :4])
                    ack_host.fill_(expected)
                    expected += 1
                    done += 1
            except BaseException as e:  # re-raised below
                errors.append(e)
                ack_host.fill_(steps)

        thread = threading.Thread(target=cpu)
        thread.start()
        graph.replay()
        torch.cuda.synchronize()
        thread.join(timeout=60)
        if errors:
            raise errors[0]
    else:
        ret_buffer = torch.zeros(64, 8, dtype=torch.bfloat16, device="cuda")
        for step in range(steps):
            batch = f.get_batch()
            ret_buffer.fill_(step + 1)  # on the stream, no synchronize: respond_vec orders itself after it
            f.respond_vec(ret_buffer, [b[1][0] for b in batch], [b[0] for b in batch])
            done += 1
    f.stop()
    return done


@pytest.mark.gpu
@pytest.mark.timeout(200)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; torch sees none here")
def test_stepmesh_kernel_wait_pattern_runs_and_answers():
    results = run_mesh(_kernel_wait, env=mesh_env("cuda"), timeout=150)
    assert results.pop("scheduler") is None
    assert set(results.values()) == {12}, results
