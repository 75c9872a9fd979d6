"""The replacement server of tests/test_rejoin.py: joins under the dead server's rank, answers, stops."""

from __future__ import annotations

import torch  # noqa: F401 - tensors arrive as torch tensors

import stepmesh as f

f.init()
answered = 0
while True:
    batch = f.get_batch(timeout_ms=4000)
    if not batch:
        break
    for h, (t,), _ in batch:
        f.respond([t * 3], h)  # a different answer: the worker sees who answers
        answered += 1
print(f"RESULT replacement answered {answered}", flush=True)
f.stop()
