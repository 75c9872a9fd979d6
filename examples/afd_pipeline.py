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
(``respond``).

Every worker checks each result against the same FFN computed locally and
prints the round-trip latency. The script exits non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import os
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
    node = f._node
    servers = node.num_servers
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
                    raise SystemExit(f"worker {node.rank}: wrong FFN output at step {step} layer {layer} stage {stage}")
                checked += 1
    rtts.sort()
    print(
        f"worker {node.rank}: {checked} micro-batches checked against the local FFN; "
        f"round trip (3 stages in flight) p50 {statistics.median(rtts):.0f} us, "
        f"p99 {rtts[int(0.99 * (len(rtts) - 1))]:.0f} us",
        flush=True,
    )


def run_server(args: argparse.Namespace) -> None:
    node = f._node
    w_in, w_out = ffn_weights(args.hidden, args.inter, node.config.num_servers, node.rank)
    served = 0
    for _ in range(args.steps * args.layers * STAGES):
        for handle, (x, count), _keys in f.get_batch():
            n = int(count[0])
            assert x.shape[0] == n, (x.shape, n)
            f.respond([ffn(x, w_in, w_out).to(torch.bfloat16)], handle)
            served += 1
    print(f"server {node.rank}: answered {served} requests", flush=True)


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
    role = os.environ.get("DMLC_ROLE")
    if role == "worker":
        run_worker(args)
    elif role == "server":
        run_server(args)
    f.stop()


if __name__ == "__main__":
    main()
