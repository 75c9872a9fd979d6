"""The raw pipelining baseline runs (a few exchanges; no timing asserts)."""

from __future__ import annotations

import pytest
from raw_pipelining import measure


@pytest.mark.timeout(120)
@pytest.mark.parametrize("depth", [1, 3])
def test_raw_exchanges_complete_at_each_depth(depth):
    assert measure(64 * 1024, depth, 50) > 0
