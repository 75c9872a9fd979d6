import os

import pytest

# Short bounds so failure paths finish quickly; every test overrides as needed.
FAST = {
    "STEPMESH_INIT_TIMEOUT_MS": "20000",
    "STEPMESH_HEARTBEAT_INTERVAL_MS": "200",
    "STEPMESH_HEARTBEAT_TIMEOUT_MS": "3000",
    "UCX_WARN_UNUSED_ENV_VARS": "n",
}


@pytest.fixture
def fast_env() -> dict[str, str]:
    return dict(FAST)
