"""stepmesh's vLLM AFD plugin connector, driven as the plugin's runners drive a connector (real processes)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from stepmesh.testing import free_port, run_commands

from .conftest import DEVICES

HERE = Path(__file__).resolve().parent



@pytest.mark.timeout(240)
@pytest.mark.parametrize("device", DEVICES)
def test_vllm_afd_plugin_connector_two_attention_ranks_one_ffn_rank(device):
    """3 stages x 20 layers, dynamic token counts, every answer checked; FFN rank 0 starts the scheduler."""
    port = str(free_port())
    env = {
        "PYTHONPATH": os.pathsep.join([str(HERE / "standin"), os.environ.get("PYTHONPATH", "")]),
        "UCX_WARN_UNUSED_ENV_VARS": "n",
        "STEPMESH_HEARTBEAT_TIMEOUT_MS": "3000",
        "STEPMESH_HEARTBEAT_INTERVAL_MS": "200",
        "STEPMESH_AUTH_TOKEN": "afd-secret",  # every rank and the scheduler FFN rank 0 starts must read it
    }
    node = [sys.executable, str(HERE / "vllm_plugin_node.py")]
    results = run_commands(
        {
            "ffn-0": [*node, "ffn", "0", port, "20", device, "2", "1"],
            "attention-0": [*node, "attention", "0", port, "20", device, "2", "1"],
            "attention-1": [*node, "attention", "1", port, "20", device, "2", "1"],
        },
        timeout=200,
        env=env,
    )
    for name, r in results.items():
        assert r.returncode == 0, f"{name} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    lines = [line for r in results.values() for line in r.stdout.splitlines() if line.startswith("RESULT")]
    assert sorted(lines) == [
        "RESULT attention 0: 60 stages checked, 0 wrong",
        "RESULT attention 1: 60 stages checked, 0 wrong",
        "RESULT ffn 0: 60 stages answered, 0 wrong",
    ], lines
