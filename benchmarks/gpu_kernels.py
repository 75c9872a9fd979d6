"""Check that moving CUDA tensors launches no kernel: profile push_pull/respond with CUPTI.

Both processes run under torch.profiler (CUDA activities) for N round trips
with pre-made tensors; prints the GPU activities seen in each, by kind.

    python benchmarks/gpu_kernels.py
"""

from __future__ import annotations

from collections import Counter

import torch

from stepmesh.testing import NodeContext, run_mesh

N = 50


def _node(ctx: NodeContext) -> dict[str, int]:
    from torch.profiler import ProfilerActivity, profile

    import stepmesh as f

    f.init()
    shapes = [((64, 7168), torch.bfloat16), ((1,), torch.int32)]
    if ctx.role == "server":
        answers = [torch.ones(s, dtype=d, device="cuda") for s, d in shapes]
        for i, (s, d) in enumerate(shapes):
            n = torch.empty(s, dtype=d).nbytes
            f.register_recv_buffer(torch.empty(n, dtype=torch.uint8, device="cuda"), [0], [i])
    else:
        push = [torch.ones(s, dtype=d, device="cuda") for s, d in shapes]
        pull = [torch.zeros(s, dtype=d, device="cuda") for s, d in shapes]
    torch.cuda.synchronize()
    f.barrier()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(N):
            if ctx.role == "server":
                for h, _, _ in f.get_batch():
                    f.respond(answers, h)
            else:
                f.wait(f.push_pull(push, [0, 1], pull, [0, 1]))
        if ctx.role == "server":
            f.flush()
    kinds: Counter[str] = Counter()
    for e in prof.events():
        if e.device_type.name == "CUDA":
            name = e.name.lower()
            kind = "memcpy" if "memcpy" in name else "memset" if "memset" in name else "kernel"
            kinds[kind] += 1
            if kind == "kernel":
                kinds["kernel: " + e.name[:60]] += 1
    f.stop()
    return dict(kinds)


if __name__ == "__main__":
    r = run_mesh(_node, env={"STEPMESH_BACKEND": "GPU"}, timeout=120)
    r.pop("scheduler")
    for name, kinds in sorted(r.items()):
        print(f"{name}: {N} round trips, GPU activities: {kinds or 'none'}")
    assert not any(k.startswith("kernel") for kinds in r.values() for k in kinds), "a kernel moved data"
