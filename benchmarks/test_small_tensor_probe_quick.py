"""The small-tensor probe runs every mode on the CPU (a few round trips; no timing asserts)."""

from __future__ import annotations

import pytest
from small_tensor_probe import MODES, measure


@pytest.mark.timeout(120)
def test_every_mode_moves_the_small_tensor_and_is_timed():
    samples = measure("cpu", big=64 * 1024, small=4, iters=40, rounds=2, warmup=5)
    assert set(samples) == set(MODES)
    for mode, ns in samples.items():
        assert len(ns) == 40, mode
        assert min(ns) > 0, mode
