
import subprocess
import sys
from collections.abc import Mapping

import pytest
import torch

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


# Tests whose bodies make sense on a GPU run once per device: ``cuda`` is marked
# ``gpu`` (``pytest -m gpu`` runs the GPU suite) and skipped, with the reason, where
# torch sees no CUDA device.
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; torch sees none here"),
        ],
    ),
]


def mesh_env(device: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a test mesh on ``device`` (every process on GPU 0 for ``cuda``)."""
    env = dict(FAST)
    if device == "cuda":
        env["STEPMESH_BACKEND"] = "GPU"
    env.update(extra or {})
    return env


@pytest.fixture(scope="session", autouse=True)
def _warm_imports() -> None:
    """Import torch and ucxx once before any mesh starts.

    On a fresh install the first import compiles every module and loads UCX's
    libraries from cold storage; nodes of one mesh doing that at once start
    seconds apart, which tests with short init timeouts would read as a
    missing node.
    """
    code = "import torch, stepmesh.data, stepmesh.control.transport as t; t.bound_core()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
