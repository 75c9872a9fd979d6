"""One rank of tests/test_integrations.py: vLLM's AFD plugin calling stepmesh's connector, as its runners do.

    python vllm_plugin_node.py attention|ffn ROLE_RANK PORT LAYERS DEVICE ATTENTION_RANKS FFN_RANKS

Prints one RESULT line; exits 1 when an answer was wrong.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
from afd_plugin.config import AFDConfig
from afd_plugin.connectors.metadata import AFDTransferContext, AFDTransferMetadata

from stepmesh.integrations.vllm import StepMeshAFDConnector

role, role_rank, port, layers, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
n_attn, n_ffn = int(sys.argv[6]), int(sys.argv[7])
stages, hidden = 3, 1024
vllm_config = SimpleNamespace(
    model_config=SimpleNamespace(hf_config=SimpleNamespace(hidden_size=hidden, num_hidden_layers=layers), dtype=torch.bfloat16),
    scheduler_config=SimpleNamespace(max_num_batched_tokens=32),
    additional_config={"afd": {"connector_extra_config": {"stages": stages, "progress": "blocking"}}},
)
afd = AFDConfig(role=role, host="127.0.0.1", port=port, num_attention_ranks=n_attn, num_ffn_ranks=n_ffn)
connector = StepMeshAFDConnector(rank=role_rank, local_rank=0, vllm_config=vllm_config, afd_config=afd, role_rank=role_rank)
connector.init_afd_connector()
assert connector.is_initialized
checked = wrong = 0
if role == "attention":
    sent: dict[int, torch.Tensor] = {}
    for layer in range(layers + 1):
        for stage in range(stages):
            if layer > 0:  # the attention runner waits for a stage's FFN output before its next layer
                out = connector.recv_ffn_output(torch.empty(0), ubatch_idx=stage)
                x = sent.pop(stage)
                checked += 1
                wrong += not torch.equal(out, x * 2 + 1)
                assert out.untyped_storage().data_ptr() == connector._recv[stage].untyped_storage().data_ptr(), "copied"
            if layer == layers:
                continue
            n = 1 + (layer * 7 + stage * 5 + role_rank * 3) % 32
            x = torch.randn(n, hidden, device=device).to(torch.bfloat16)  # on the stream, not synchronised
            meta = AFDTransferMetadata.create_attention_metadata(layer_idx=layer, stage_idx=stage, seq_len=n)
            connector.send_attn_output(x, AFDTransferContext(metadata=meta))
            sent[stage] = x
else:
    for i in range(layers * stages):
        payload = connector.recv_attn_output()
        meta = payload.context.metadata
        if (meta.layer_idx, meta.stage_idx) != divmod(i, stages):  # the stage the Attention ranks sent
            print("MISMATCH", i, meta.layer_idx, meta.stage_idx, flush=True)
            wrong += 1
        out = payload.hidden_states * 2 + 1
        connector.send_ffn_output(out, payload.context)
        out.fill_(-1)  # the connector's answer buffer is the caller's again at once
        checked += 1
    try:  # the Attention ranks close: no stage comes any more, and the FFN loop learns it
        connector.recv_attn_output()
        wrong += 1
    except RuntimeError as e:
        assert "stopped" in str(e), e
connector.close()
print(f"RESULT {role} {role_rank}: {checked} stages {'checked' if role == 'attention' else 'answered'}, {wrong} wrong",
      flush=True)
sys.exit(1 if wrong else 0)
