"""The soak in a short form: no memory or file-descriptor growth over a few thousand push_pulls."""

from __future__ import annotations

import pytest
from soak import run_soak


@pytest.mark.timeout(300)
def test_short_soak_does_not_grow():
    results = run_soak(3000, warmup=500)
    for name, r in results.items():
        assert r["rss_end_mb"] - r["rss_start_mb"] < 10, (name, r)
        assert r["fds_end"] <= r["fds_start"], (name, r)
