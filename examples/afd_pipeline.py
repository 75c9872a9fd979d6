"""A 3-stage Attention-FFN disaggregation pipeline, end to end.

Run it with the launcher (1 scheduler, N FFN servers, M attention workers)::

    stepmesh launch --workers 2 --servers 2 -- python examples/afd_pipeline.py

Attention side (workers): every layer splits its tokens into 3 micro-batches
("stages") with their own buffers and keys, and keeps all 3 push_pulls in
flight: it pushes the hidden states (bf16) and the token count (int32) to
every FFN server and pulls each server's partial FFN output straight into its
own buffers. The token count changes from step to step (dynamic shapes: the
pushes are slices of one buffer).

FFN side (servers): each server owns a slice of the FFN's intermediate
dimension, so the workers sum the servers' partial outputs. A server takes one
batch from every worker (``get_batch``), computes, and answers each worker
(``respond``), until every worker has stopped (``workers_stopped``).

Every worker checks every result against the same FFN computed locally and
prints OK (or FAILED, and exits non-zero) with the round-trip latency, which
includes the toy FFN's compute on the servers' CPU: it is not the
communication's latency (``stepmesh bench`` measures that).
"""

from __future__ import annotations

import argparse
import statistics

import torch

import stepmesh as f

STAGES = 3


def ffn_weights(hidden: int, inter: int, num_servers: int, server: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's slice of a toy FFN (same seed everywhere, so workers can check)."""
    g = torch.Generator().manual_seed(1234)
    w_in = torch.randn(hidden, inter, generator=g) / hidden**0.5
    w_out = torch.randn(inter, hidden, generator=g) / inter**0.5
    part = inter // num_servers
    cols = slice(server * part, (server + 1) * part)
    return w_in[:, cols].contiguous(), w_out[cols, :].contiguous()


def ffn(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    return torch.relu(x.float() @ w_in) @ w_out


def tokens_for(step: int, layer: int, stage: int, max_tokens: int) -> int:
    return max(1, max_tokens - (step * 7 + layer * 3 + stage * 5) % (max_tokens // 2))


def key(layer: int, stage: int, slot: int) -> int:
    return (layer * STAGES + stage) * 4 + slot


def run_worker(args: argparse.Namespace) -> None:
    me = f.node_info()
    servers = me.num_servers
    weights = [ffn_weights(args.hidden, args.inter, servers, s) for s in range(servers)]
    hidden = [torch.randn(args.tokens, args.hidden).to(torch.bfloat16) for _ in range(STAGES)]
    counts = [torch.zeros(1, dtype=torch.int32) for _ in range(STAGES)]
    outs = [[torch.zeros(args.tokens, args.hidden, dtype=torch.bfloat16) for _ in range(servers)] for _ in range(STAGES)]
    rtts: list[float] = []
    checked = 0
    for step in range(args.steps):
        for layer in range(args.layers):
            handles = []
            for stage in range(STAGES):
                n = tokens_for(step, layer, stage, args.tokens)
                counts[stage][0] = n
                push = [hidden[stage][:n], counts[stage]]
                pull_keys = [key(layer, stage, 2) for _ in range(servers)]
                h = f.push_pull(push, [key(layer, stage, 0), key(layer, stage, 1)], outs[stage], pull_keys)
                handles.append((h, n, f.get_nanosecond()))
            for stage, (h, n, t0) in enumerate(handles):
                f.wait(h)
                rtts.append((f.get_nanosecond() - t0) / 1000)
                got = sum(o[:n].float() for o in outs[stage])
                want = sum(ffn(hidden[stage][:n], *w).to(torch.bfloat16).float() for w in weights)
                if not torch.allclose(got, want, rtol=2e-2, atol=2e-2):
                    print(f"worker {me.rank}: FAILED: wrong FFN output at step {step} layer {layer} stage {stage}",
                          flush=True)
                    raise SystemExit(1)
                checked += 1
    rtts.sort()
    print(
        f"worker {me.rank}: OK: all {checked} micro-batches matched the FFN computed locally; "
        f"round trip with 3 stages in flight, the servers' toy FFN on the CPU included: "
        f"p50 {statistics.median(rtts):.0f} us, p99 {rtts[int(0.99 * (len(rtts) - 1))]:.0f} us",
        flush=True,
    )


def run_server(args: argparse.Namespace) -> None:
    me = f.node_info()
    w_in, w_out = ffn_weights(args.hidden, args.inter, me.num_servers, me.rank)
    served = 0
    while True:
        batch = f.get_batch()
        if not batch and f.workers_stopped():  # every worker is done: nothing more will come
            break
        for handle, (x, count), _keys in batch:
            n = int(count[0])
            assert x.shape[0] == n, (x.shape, n)
            f.respond([ffn(x, w_in, w_out).to(torch.bfloat16)], handle)
            served += 1
    print(f"server {me.rank}: answered {served} requests until every worker had stopped", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=128, help="max tokens per micro-batch")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=512)
    args = p.parse_args()
    torch.set_num_threads(1)
    f.init()
    role = f.node_info().role
    if role == "worker":
        run_worker(args)
    elif role == "server":
        run_server(args)
    f.stop()


if __name__ == "__main__":
    main()
