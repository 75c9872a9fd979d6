
import subprocess
import sys

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


@pytest.fixture(scope="session", autouse=True)
def _warm_imports() -> None:
    """Import torch and ucxx once before any mesh starts.

    On a fresh install the first import compiles every module and loads UCX's
    libraries from cold storage; nodes of one mesh doing that at once start
    seconds apart, which tests with short init timeouts would read as a
    missing node.
    """
    code = "import torch, stepmesh.transport as t; t._ucx()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
