"""One node of the network-namespace tests (run as a script inside a namespace).

NS_MODE=sum: the seed's sum test. NS_MODE=mxn: every server answers something
of its own. NS_MODE=cut: workers push_pull until the link is cut, then report
when PeerError came. Prints one line starting with RESULT.
"""

from __future__ import annotations

import os
import time

import torch

import stepmesh as f

mode = os.environ["NS_MODE"]
role = os.environ["DMLC_ROLE"]
f.init()
node = f._node
if role == "worker":
    rank = node.rank
    servers = node.num_servers
    if mode == "cut":
        open(os.environ["NS_READY_FILE"] + f".{rank}", "w").close()
        t_error = None
        while t_error is None:
            try:
                f.wait(f.push_pull([torch.ones(1000)], [0], [torch.zeros(1000) for _ in range(servers)], [0] * servers))
            except f.PeerError as e:
                t_error = time.time()
                print(f"RESULT peer-error {t_error:.3f} {e}", flush=True)
            time.sleep(0.01)
        os._exit(0)  # the link is gone: nothing left to stop cleanly
    for n in (64, 300_000):
        push = [torch.rand(n) for _ in range(3)]
        pull = [torch.zeros(n) for _ in range(servers)]
        f.wait(f.push_pull(push, [0, 1, 2], pull, [3] * servers), timeout_ms=20000)
        for s in range(servers):
            expect = push[0] + push[1] + push[2] + (100 * s if mode == "mxn" else 0)
            assert torch.allclose(pull[s], expect), (s, pull[s][:3])
    print(f"RESULT ok worker {rank}", flush=True)
else:
    extra = 100 * node.rank if mode == "mxn" else 0
    served = 0
    try:
        while mode == "cut" or served < 2:
            for h, ts, _ in f.get_batch(timeout_ms=60000):
                f.respond([ts[0] + ts[1] + ts[2] + extra] if len(ts) == 3 else [ts[0]], h)
            served += 1
    except f.PeerError:  # the link to the workers was cut
        os._exit(0)
    print("RESULT ok server", flush=True)
f.stop()
